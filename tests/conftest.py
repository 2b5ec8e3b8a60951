"""Shared test setup.

Without a GPU, kernels run through Triton's interpreter on the CPU. TRITON_INTERPRET must be set
before any module that defines @triton.jit kernels is imported, so it is decided here, first. On a
CUDA machine the compiled kernels are what the tests should exercise, so the interpreter stays off
(set TRITON_INTERPRET yourself to override either way).
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

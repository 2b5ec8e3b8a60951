"""Shared test setup.

Kernels run through Triton's interpreter on the CPU: TRITON_INTERPRET must be set before any
module that defines @triton.jit kernels is imported, so it is set here, first.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

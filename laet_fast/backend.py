"""Which implementation runs a kernel call: Triton on CUDA, Triton's interpreter on CPU, or PyTorch.

The decision is per call, from the tensors' device:

* CUDA tensors -> the Triton kernel.
* CPU tensors with ``TRITON_INTERPRET=1`` set before the kernels were imported -> the Triton
  kernel through the interpreter (this is how the test suite runs kernels without a GPU).
* Anything else -> the PyTorch reference in ``laet_fast.kernels``, announced once in the log.
  That includes every call where Triton is not installed (it has wheels for Linux only).

``LAET_FAST_BACKEND=torch`` forces the reference path everywhere (debugging, A/B benchmarks).
"""
from __future__ import annotations

import contextlib
import logging
import os
import types

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    # The kernel modules import `triton` and `tl` from here. Without Triton their @triton.jit
    # functions stay plain functions that are never launched, and the launch-size helpers still
    # answer, so every kernel module imports and every call takes its PyTorch reference.
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length())
    tl = None

logger = logging.getLogger("laet_fast")

# Triton decides at decoration time whether @triton.jit builds an interpreted function, so what
# matters is the environment when this module (imported by every kernel module) is loaded.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FORCE_ENV = "LAET_FAST_BACKEND"

_announced: set[str] = set()


def _announce_once(key: str, message: str) -> None:
    if key not in _announced:
        _announced.add(key)
        logger.warning(message)


def force_reference() -> bool:
    """True when ``LAET_FAST_BACKEND=torch`` asks for the PyTorch reference path."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if value not in ("", "torch", "triton", "auto"):
        raise ValueError(f"{FORCE_ENV}={value!r} is not understood; use 'torch' (reference path) or unset it.")
    return value == "torch"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide whether a kernel call on ``tensors`` should launch the Triton kernel.

    Returns False (use the PyTorch reference) when forced by ``LAET_FAST_BACKEND=torch``, or when
    the tensors are on the CPU and Triton's interpreter is off. Mixed devices are refused.
    """
    if force_reference():
        _announce_once("forced", f"laet_fast: {FORCE_ENV}=torch, using the PyTorch reference kernels.")
        return False
    if not HAS_TRITON:
        _announce_once("no-triton", "laet_fast: triton is not installed; running the PyTorch reference kernels.")
        return False
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"laet_fast kernel got tensors on several devices {sorted(devices)}; move them to one device.")
    device = devices.pop() if devices else "cpu"
    if device == "cuda":
        return True
    if device == "cpu" and TRITON_INTERPRET:
        return True
    _announce_once(
        f"fallback-{device}",
        f"laet_fast: no CUDA device and TRITON_INTERPRET is off; running the PyTorch reference path on {device}.",
    )
    return False


def launch_device(device: torch.device):
    """Context that makes ``device`` current for a kernel launch.

    Triton launches on the current CUDA device, not on the device of its tensor arguments, so a
    launch for ``cuda:1`` needs ``cuda:1`` current. A no-op off CUDA.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

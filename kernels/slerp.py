"""SLERP of two same-shape tensors with mergekit's semantics, in two passes over the inputs.

With ``a`` the base tensor, ``b`` the other one and ``t`` the weight of ``b`` (t=0 gives ``a``,
t=1 gives ``b``), eps = 1e-8 and DOT_THRESHOLD = 0.9995 (mergekit's ``slerp``)::

    n_a = ||a|| if ||a|| > eps else 1          (a tensor is normalized only when its norm exceeds eps)
    n_b = ||b|| if ||b|| > eps else 1
    dot = sum(a * b) / (n_a * n_b)             (over the flattened tensors)
    if |dot| > DOT_THRESHOLD:                  (nearly colinear: linear interpolation, unnormalized)
        out = (1 - t) * a + t * b
    else:
        theta = arccos(dot)
        out = sin(theta - t * theta) / sin(theta) * a + sin(t * theta) / sin(theta) * b

A zero tensor is therefore never normalized: its dot is 0, theta = pi/2 and the result is
``sin(t * pi/2) * b`` (for ``a = 0``), as in mergekit. The result has ``a``'s dtype unless
``out_dtype`` says otherwise (mergekit casts to the base model's dtype).

The kernel path reads both inputs once to reduce ||a||^2, ||b||^2 and a.b in float32 (per-program
partials, no atomics, so the result is deterministic), sums the partials in float64, decides the
branch and the two coefficients on the host (one sync: three numbers), then reads both inputs once
more and writes ``s0 * a + s1 * b``, in float32 before the cast to the output dtype.
"""
from __future__ import annotations

import functools

import torch

from laet_fast.backend import launch_device, use_triton, tl, triton

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8

# On the GPU a tile is 16 elements per thread of 8 warps; each pass launches at most 8 programs
# per SM, looping over tiles, so the pass-1 partials stay a few KB. Under the interpreter tiles
# are small and the grid is capped low so that test sizes of a few thousand elements already loop
# over several tiles per program and reduce over several programs.
GPU_BLOCK = 4096
GPU_NUM_WARPS = 8
GPU_PROGRAMS_PER_SM = 8
INTERPRET_BLOCK = 256
INTERPRET_MAX_PROGRAMS = 16
# Pinned, not left to Triton's default (which turns off in 3.10): both passes are multiply-adds
# (the sums of products, s0 * a + s1 * b), and fused they round once per term instead of twice.
ENABLE_FP_FUSION = True


@triton.jit
def _slerp_reduce_kernel(a_ptr, b_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    """Pass 1: program ``pid`` reduces tiles pid, pid + nprog, ... into partials[pid] = (aa, bb, ab)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offsets = tl.arange(0, BLOCK)
    aa = tl.zeros([BLOCK], dtype=tl.float32)
    bb = tl.zeros([BLOCK], dtype=tl.float32)
    ab = tl.zeros([BLOCK], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n, BLOCK), n_programs):
        idx = tl.cast(tile, tl.int64) * BLOCK + offsets
        in_bounds = idx < n
        # Upcast before any arithmetic: fp32 accumulation, and bf16 arithmetic is wrong under the
        # interpreter.
        a = tl.load(a_ptr + idx, mask=in_bounds, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx, mask=in_bounds, other=0.0).to(tl.float32)
        aa += a * a
        bb += b * b
        ab += a * b
    tl.store(partial_ptr + pid * 3 + 0, tl.sum(aa, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(bb, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(ab, axis=0))


@triton.jit
def _slerp_write_kernel(a_ptr, b_ptr, out_ptr, n, s0, s1, BLOCK: tl.constexpr):
    """Pass 2: out = s0 * a + s1 * b in float32, stored in out's dtype; same tile walk as pass 1."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    offsets = tl.arange(0, BLOCK)
    for tile in range(pid, tl.cdiv(n, BLOCK), n_programs):
        idx = tl.cast(tile, tl.int64) * BLOCK + offsets
        in_bounds = idx < n
        a = tl.load(a_ptr + idx, mask=in_bounds, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx, mask=in_bounds, other=0.0).to(tl.float32)
        out = s0 * a + s1 * b
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=in_bounds)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, number of programs, num_warps) for both passes of one call."""
    if device.type == "cuda":
        n_tiles = triton.cdiv(n, GPU_BLOCK)
        return GPU_BLOCK, min(n_tiles, _sm_count(device.index or 0) * GPU_PROGRAMS_PER_SM), GPU_NUM_WARPS
    return INTERPRET_BLOCK, min(triton.cdiv(n, INTERPRET_BLOCK), INTERPRET_MAX_PROGRAMS), 4


def _check_inputs(a: torch.Tensor, b: torch.Tensor, t: float) -> None:
    """Metadata checks only (no device value is read)."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of one shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
    if not a.dtype.is_floating_point or not b.dtype.is_floating_point:
        raise ValueError(f"slerp needs floating tensors; got {a.dtype} and {b.dtype}.")
    if a.device != b.device:
        raise ValueError(f"slerp needs both tensors on one device; got {a.device} and {b.device}.")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"slerp's t is the weight of b and must be a number in [0, 1]; got {t!r}.")


def slerp_coefficients(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor,
                       t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two weights (s0, s1) with ``slerp(a, b, t) = s0 * a + s1 * b``.

    Args:
        aa, bb, ab: 0-dim float tensors ||a||^2, ||b||^2 and a.b (float64 for an exact branch
            decision), on any device.
        t: weight of ``b`` in [0, 1].

    Returns 0-dim tensors of ``aa``'s dtype and device, computed with tensor ops only (no sync),
    following mergekit's rule written out in this module's docstring.
    """
    norm_a, norm_b = aa.sqrt(), bb.sqrt()
    one = torch.ones_like(norm_a)
    dot = ab / (torch.where(norm_a > NORM_EPS, norm_a, one) * torch.where(norm_b > NORM_EPS, norm_b, one))
    colinear = dot.abs() > DOT_THRESHOLD
    # Rounding can push a colinear dot past 1; that branch does not use theta, so clamping is safe.
    theta = torch.acos(dot.clamp(-1.0, 1.0))
    sin_theta = torch.where(colinear, one, torch.sin(theta))
    s0 = torch.where(colinear, 1.0 - t * one, torch.sin(theta - t * theta) / sin_theta)
    s1 = torch.where(colinear, t * one, torch.sin(t * theta) / sin_theta)
    return s0, s1


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None,
                    compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """PyTorch reference of ``slerp``: same arguments and result, math in ``compute_dtype``.

    ``a``, ``b``: same shape, any float dtypes, one device. Returns a tensor of ``a``'s shape in
    ``out_dtype`` (default ``a.dtype``). Computes the three reductions and the result in
    ``compute_dtype`` (float64 by default; the fallback path of ``slerp`` uses float32, like the
    kernel) and never syncs with the host, so it also runs under ``torch.compile``.
    """
    _check_inputs(a, b, t)
    x = a.reshape(-1).to(compute_dtype)
    y = b.reshape(-1).to(compute_dtype)
    sums = torch.stack([torch.dot(x, x), torch.dot(y, y), torch.dot(x, y)]).to(torch.float64)
    s0, s1 = slerp_coefficients(sums[0], sums[1], sums[2], t)
    out = s0.to(compute_dtype) * x + s1.to(compute_dtype) * y
    return out.to(out_dtype or a.dtype).view(a.shape)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Spherical interpolation of ``a`` (t=0) and ``b`` (t=1), mergekit's semantics (module docstring).

    Args:
        a: base tensor, any shape, float32/bfloat16/float16 (any float dtype on the reference path).
            Non-contiguous inputs are copied to contiguous ones first.
        b: tensor of ``a``'s shape, any float dtype, same device.
        t: weight of ``b``, a number in [0, 1].
        out_dtype: dtype of the result (default ``a.dtype``, as mergekit).

    Returns a new tensor of ``a``'s shape. Runs the two-pass Triton kernel when
    ``laet_fast.backend.use_triton`` says so (CUDA, or the interpreter on CPU), else
    ``slerp_reference`` in float32. The kernel path syncs with the host once (three numbers).
    Non-finite inputs give a non-finite result, as in mergekit.
    """
    _check_inputs(a, b, t)
    out_dtype = out_dtype or a.dtype
    if a.numel() == 0:
        return torch.empty(a.shape, dtype=out_dtype, device=a.device)
    if not use_triton(a, b):
        return slerp_reference(a, b, t, out_dtype=out_dtype, compute_dtype=torch.float32)
    x, y = a.contiguous().view(-1), b.contiguous().view(-1)
    n = x.numel()
    block, n_programs, num_warps = _launch_config(n, x.device)
    partials = torch.empty(n_programs, 3, dtype=torch.float32, device=x.device)
    out = torch.empty(n, dtype=out_dtype, device=x.device)
    with launch_device(x.device):
        _slerp_reduce_kernel[(n_programs,)](x, y, partials, n, BLOCK=block, num_warps=num_warps,
                                            enable_fp_fusion=ENABLE_FP_FUSION)
        aa, bb, ab = partials.sum(0, dtype=torch.float64).cpu()
        s0, s1 = (float(s) for s in slerp_coefficients(aa, bb, ab, float(t)))
        _slerp_write_kernel[(n_programs,)](x, y, out, n, s0, s1, BLOCK=block, num_warps=num_warps,
                                           enable_fp_fusion=ENABLE_FP_FUSION)
    return out.view(a.shape)

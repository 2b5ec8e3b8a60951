"""Masked pooling of a block's output: one vector per sequence, in one kernel launch.

For hidden states ``h`` of shape ``[B, T, H]`` and a padding mask ``m`` of shape ``[B, T]``
(nonzero = real token), ``masked_pool`` returns float32 ``[B, H]``:

* ``"mean"``:  ``out[b] = sum_{t: m[b, t] != 0} h[b, t] / |{t: m[b, t] != 0}|``
* ``"last"``:  ``out[b] = h[b, t_last]`` with ``t_last = max{t: m[b, t] != 0}``
* ``"first"``: ``out[b] = h[b, t_first]`` with ``t_first = min{t: m[b, t] != 0}``

so left and right padding both work (the last real token of a left-padded row is at ``T - 1``,
of a right-padded row before its padding). A row with no real token pools to NaN, so that it cannot
pass for a real embedding (callers check for NaN once, at the end).

Every mode is the same kernel: each row ``b`` reads only the tokens ``t`` in ``[start[b], stop[b])``
(all real tokens' span for mean, the one chosen token for last/first), skips the masked ones
inside that span, sums in float32 and multiplies by ``scale[b]`` (``1 / count`` for mean, 1
otherwise). Padding is never loaded, so values there (even NaN) cannot leak in. The span and scale
are [B] tensors made with a few tiny torch ops on the device; nothing is read on the host.

The backward is a broadcast, ``grad_h[b, t] = grad_out[b] * scale[b] * [t real and in the span]``,
written as one torch expression.
"""
from __future__ import annotations

import torch

from laet_fast.backend import launch_device, use_triton, tl, triton

POOLING_MODES = ("mean", "last", "first")

# Tile sizes. On the GPU a program owns one row and 64 features, so B * H / 64 programs (144 for
# 16 x 576) keep the SMs busy at small batch; it walks the row's span 32 tokens at a time. Under the
# interpreter the tiles are small so that the test sizes loop over both dims more than once.
GPU_BLOCK_T, GPU_BLOCK_H, GPU_NUM_WARPS = 32, 64, 4
INTERPRET_BLOCK_T, INTERPRET_BLOCK_H = 8, 32
# Pinned (Triton 3.10 turns fusion off by default): this kernel only adds, and multiplies once at
# the end, so no multiply-add exists to fuse and the choice changes no result.
ENABLE_FP_FUSION = True


@triton.jit
def _masked_pool_kernel(
    h_ptr, mask_ptr, start_ptr, stop_ptr, scale_ptr, out_ptr,
    hidden, stride_hb, stride_ht, stride_mb, stride_mt,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (b, j) pools features ``j * BLOCK_H ...`` of row ``b`` over its span of tokens."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    start = tl.load(start_ptr + row)
    stop = tl.load(stop_ptr + row)
    token_offsets = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    row_ptr = h_ptr + row.to(tl.int64) * stride_hb
    for t0 in range(start, stop, BLOCK_T):
        tokens = t0 + token_offsets
        real = tokens < stop
        if HAS_MASK:
            flags = tl.load(mask_ptr + row.to(tl.int64) * stride_mb + tokens * stride_mt, mask=real, other=0)
            real = real & (flags != 0)
        ptrs = row_ptr + tokens.to(tl.int64)[:, None] * stride_ht + cols[None, :]
        # Upcast before adding: fp32 accumulation (and bf16 arithmetic is wrong under the interpreter).
        x = tl.load(ptrs, mask=real[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=0)
    scale = tl.load(scale_ptr + row)
    tl.store(out_ptr + row.to(tl.int64) * hidden + cols, acc * scale, mask=col_ok)


def _check_inputs(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> None:
    """Shape/dtype/device checks; metadata only, no device value is read."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling {mode!r}; use one of {', '.join(POOLING_MODES)}.")
    if hidden.dim() != 3 or not hidden.dtype.is_floating_point:
        raise ValueError(f"masked_pool needs floating hidden states [batch, seq, hidden]; got {hidden.dtype} "
                         f"{tuple(hidden.shape)}.")
    if mask is None:
        return
    if tuple(mask.shape) != tuple(hidden.shape[:2]) or mask.device != hidden.device:
        raise ValueError(f"the attention mask must be [batch, seq]={list(hidden.shape[:2])} on {hidden.device}; "
                         f"got {list(mask.shape)} on {mask.device}.")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"the attention mask must be bool or integer (nonzero = real token); got {mask.dtype}. A "
                         "float mask may be additive (0 = real, -inf = padding), so it is refused rather than "
                         "guessed: pass mask != 0 or the integer attention_mask.")


def _spans(mask: torch.Tensor | None, batch: int, seq: int, mode: str, device) -> tuple:
    """(start int32 [B], stop int32 [B], scale float32 [B]): which tokens each row reads, and the factor.

    Rows with no real token get an empty span and a NaN scale.
    """
    if mask is None:
        start = torch.zeros(batch, dtype=torch.int32, device=device)
        stop = torch.full((batch,), seq, dtype=torch.int32, device=device)
        if mode == "last":
            start = stop - 1
        elif mode == "first":
            stop = start + 1
        count = (stop - start).to(torch.float32)
        scale = 1.0 / count if mode == "mean" else torch.ones(batch, dtype=torch.float32, device=device)
        return start, stop, torch.where(count > 0, scale, torch.nan)
    real = mask != 0
    positions = torch.arange(seq, device=device, dtype=torch.int32).expand(batch, seq)
    count = real.sum(1)
    # First real index (seq when none) and one past the last real index (0 when none).
    first = torch.where(real, positions, seq).amin(1) if seq else torch.zeros(batch, dtype=torch.int32, device=device)
    stop = torch.where(real, positions + 1, 0).amax(1) if seq else torch.zeros_like(first)
    if mode == "mean":
        start, scale = first, 1.0 / count.to(torch.float32)
    elif mode == "last":
        start, scale = stop - 1, torch.ones(batch, dtype=torch.float32, device=device)
    else:
        start, stop, scale = first, first + 1, torch.ones(batch, dtype=torch.float32, device=device)
    has_token = count > 0
    start = torch.where(has_token, start, 0).to(torch.int32)
    stop = torch.where(has_token, stop, 0).to(torch.int32)
    return start, stop, torch.where(has_token, scale, torch.nan)


def _weights(mask, batch, seq, mode, device) -> torch.Tensor:
    """float32 [B, T]: ``scale[b]`` on the tokens row ``b`` pools, 0 elsewhere; 0 everywhere for rows
    with no real token (their NaN output has no gradient)."""
    start, stop, scale = _spans(mask, batch, seq, mode, device)
    t = torch.arange(seq, device=device)
    inside = (t >= start[:, None]) & (t < stop[:, None])
    if mask is not None:
        inside &= mask != 0
    return torch.where(inside, torch.nan_to_num(scale, nan=0.0)[:, None], 0.0)


def masked_pool_reference(hidden: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "mean", *,
                          compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PyTorch reference of ``masked_pool``, written from the definition (module docstring).

    Returns ``[B, H]`` in ``compute_dtype`` (float32 by default, float64 for tests); NaN for rows with
    no real token. Padding values are excluded with ``torch.where``, so NaN there does not leak in.
    """
    _check_inputs(hidden, mask, mode)
    batch, seq, _ = hidden.shape
    real = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device) if mask is None else mask != 0
    x = torch.where(real[..., None], hidden.to(compute_dtype), 0.0)
    count = real.sum(1)
    if mode == "mean":
        pooled = x.sum(1) / count[:, None].to(compute_dtype)
    else:
        positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
        if mode == "last":
            index = torch.where(real, positions, -1).amax(1) if seq else count
        else:
            index = torch.where(real, positions, seq).amin(1) if seq else count
        index = index.clamp(0, max(seq - 1, 0))
        pooled = x[torch.arange(batch, device=hidden.device), index] if seq else x.sum(1)
    return torch.where((count > 0)[:, None], pooled, torch.nan)


def _launch_config(width: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps) for hidden states of ``width`` features on ``device``."""
    if device.type == "cuda":
        return GPU_BLOCK_T, min(GPU_BLOCK_H, triton.next_power_of_2(width)), GPU_NUM_WARPS
    return INTERPRET_BLOCK_T, min(INTERPRET_BLOCK_H, triton.next_power_of_2(width)), 1


def _launch(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    batch, seq, width = hidden.shape
    if hidden.shape[-1] > 1 and hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    start, stop, scale = _spans(mask, batch, seq, mode, hidden.device)
    out = torch.empty(batch, width, dtype=torch.float32, device=hidden.device)
    if batch == 0 or width == 0:
        return out
    block_t, block_h, num_warps = _launch_config(width, hidden.device)
    # Only the mean skips masked tokens inside its span; last/first spans hold one real token.
    has_mask = mask is not None and mode == "mean"
    if has_mask:
        # Triton loads bool as i1 from byte storage; viewing it as uint8 is free and unambiguous.
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        stride_mb, stride_mt = mask_arg.stride()
    else:
        mask_arg, stride_mb, stride_mt = start, 0, 0  # never dereferenced: HAS_MASK=False
    with launch_device(hidden.device):
        _masked_pool_kernel[(batch, triton.cdiv(width, block_h))](
            hidden, mask_arg, start, stop, scale, out,
            width, hidden.stride(0), hidden.stride(1), stride_mb, stride_mt,
            HAS_MASK=has_mask, BLOCK_T=block_t, BLOCK_H=block_h,
            num_warps=num_warps, enable_fp_fusion=ENABLE_FP_FUSION,
        )
    return out


class _MaskedPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, mode):
        ctx.mode, ctx.shape, ctx.dtype = mode, hidden.shape, hidden.dtype
        ctx.save_for_backward(mask if mask is not None else torch.empty(0, device=hidden.device))
        ctx.has_mask = mask is not None
        return _launch(hidden, mask, mode)

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        batch, seq, _ = ctx.shape
        weights = _weights(mask if ctx.has_mask else None, batch, seq, ctx.mode, grad_out.device)
        grad = weights[:, :, None] * grad_out.to(torch.float32)[:, None, :]
        return grad.to(ctx.dtype), None, None


def masked_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "mean") -> torch.Tensor:
    """Pool hidden states over the real tokens of each sequence (see the module docstring for the math).

    Args:
        hidden: ``[B, T, H]`` float32/bfloat16/float16 (any strides; a non-contiguous hidden dim is copied).
        mask: None (every token is real) or ``[B, T]`` bool/integer, nonzero = real token; left or right
            padding. Float masks are refused (they may be additive).
        mode: ``"mean"`` (over real tokens), ``"last"`` (last real token) or ``"first"`` (first real
            token, CLS for encoders).

    Returns:
        float32 ``[B, H]`` on ``hidden.device``, NaN in rows with no real token. Differentiable with
        respect to ``hidden``. Runs the Triton kernel when ``laet_fast.backend.use_triton`` says so (CUDA,
        or the interpreter on CPU), else ``masked_pool_reference``; reads no device value on the host.
    """
    _check_inputs(hidden, mask, mode)
    if not use_triton(hidden):
        return masked_pool_reference(hidden, mask, mode)
    return _MaskedPool.apply(hidden, mask, mode)

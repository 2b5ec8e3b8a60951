"""Fused hidden-state statistics of one transformer block: one pass over its input and output.

For a block with input ``h_in`` and output ``h_out`` (both ``[tokens, hidden]``) the kernel reads
every element of both tensors once and accumulates, in float32 and over real (unmasked) tokens
only, the five numbers laid out by ``STAT_FIELDS``:

* ``tokens``          number of real tokens,
* ``sum_one_minus_cos`` sum over tokens of 1 - cos(h_in[t], h_out[t]),
* ``sum_rel_change``  sum over tokens of ||h_out[t] - h_in[t]|| / ||h_in[t]||,
* ``sum_sq``          sum over tokens and features of h_out**2,
* ``absmax``          max over tokens and features of |h_out|.

``hidden_stats_metrics`` turns an accumulator into ShortGPT's Block Influence
(1 - mean cosine), the mean relative change, the activation RMS and the activation abs-max.

Why 1 - cos and not cos: most blocks have cos close to 1, so ``1 - sum(cos) / tokens`` cancels
catastrophically once the float32 sum is large (at 1.6M tokens, added 16 tokens per atomic as one
GPU program does, a true 0.0054 came out as 0.0060). The sum of 1 - cos stays of the size of the
answer, so each float32 add keeps its relative precision (about 1e-5 at that length). The sum of
relative changes needs no such care: its terms are of the size of the mean itself (measured:
4e-6 relative error at 1.6M tokens in adds of 16).

Near-zero norms: with eps = 1e-8,
``cos = dot(a, b) / (max(||a||, eps) * max(||b||, eps))`` and
``rel = ||b - a|| / max(||a||, eps)``; ||b - a|| is computed from the difference itself, not from
||a||^2 + ||b||^2 - 2ab, which cancels catastrophically when the block barely changes its input.

The accumulator lives on the device and is only ever updated in place (atomics in the kernel,
tensor ops in the reference path), so probing every layer of a model costs no host sync.
"""
from __future__ import annotations

import functools

import torch

from laet_fast.backend import launch_device, use_triton, tl, triton

STAT_FIELDS = ("tokens", "sum_one_minus_cos", "sum_rel_change", "sum_sq", "absmax")
NUM_STATS = len(STAT_FIELDS)
NORM_EPS = 1e-8

# Tile sizes. On the GPU a chunk row is what one warp loads with one 16-byte vector per lane
# (256 bf16/fp16, 128 fp32 values), and each of the 8 warps owns 2 token rows: per iteration a
# thread issues four 16-byte loads, and at ~64 registers (ptxas, sm_90) four programs fit per SM.
# Under the interpreter the hidden chunk is kept small so that the test sizes (hidden 72..576)
# run the hidden-dim loop more than once, and the grid is capped at a handful of programs so that
# the token-tile loop runs more than once too.
GPU_LOAD_BYTES_PER_LANE = 16
GPU_NUM_WARPS = 8
GPU_ROWS_PER_WARP = 2
GPU_PROGRAMS_PER_SM = 16
INTERPRET_MAX_BLOCK_H = 256
INTERPRET_TILE_ELEMENTS = 2048
INTERPRET_MAX_PROGRAMS = 4
# Pinned, not left to Triton's default (which turns off in 3.10): the per-token dot products and
# sums of squares are multiply-adds, and fused they round once per term instead of twice.
ENABLE_FP_FUSION = True


@triton.jit
def _hidden_stats_kernel(
    h_in_ptr, h_out_ptr, mask_ptr, acc_ptr,
    n_tokens, hidden, stride_in, stride_out, stride_mask,
    HAS_MASK: tl.constexpr, EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Each program walks token tiles pid, pid + nprog, ...; per tile it loops over the hidden dim.

    Every [BLOCK_T, BLOCK_H] chunk is reduced along the hidden dim straight away into per-token
    fp32 sums (the launcher sizes BLOCK_H to one warp's row of 16-byte loads, so this is a
    shuffle-only reduction and no [BLOCK_T, BLOCK_H] accumulator takes registers: that keeps
    four programs resident per SM and enough loads in flight for HBM). Per-token values are
    accumulated over the program's tiles and reduced to five scalars, which reach the accumulator
    through one atomic each.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_tokens, BLOCK_T)
    token_offsets = tl.arange(0, BLOCK_T)
    feature_offsets = tl.arange(0, BLOCK_H)

    tokens_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    one_minus_cos_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    rel_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    sq_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    max_acc = tl.zeros([BLOCK_T], dtype=tl.float32)

    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_T + token_offsets
        is_real = rows < n_tokens
        if HAS_MASK:
            flags = tl.load(mask_ptr + rows.to(tl.int64) * stride_mask, mask=is_real, other=0)
            is_real = is_real & (flags != 0)
        # Padded tokens are never loaded: they cost no bandwidth and their values (even NaN) are
        # never looked at.
        in_rows = h_in_ptr + rows.to(tl.int64)[:, None] * stride_in
        out_rows = h_out_ptr + rows.to(tl.int64)[:, None] * stride_out

        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        in_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        out_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        diff_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        out_absmax = tl.zeros([BLOCK_T], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_H):
            cols = start + feature_offsets
            load_mask = is_real[:, None] & (cols < hidden)[None, :]
            # Upcast before any arithmetic: fp32 accumulation, and bf16 arithmetic is wrong under
            # the interpreter.
            a = tl.load(in_rows + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
            b = tl.load(out_rows + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
            diff = b - a
            dot += tl.sum(a * b, axis=1)
            in_sq += tl.sum(a * a, axis=1)
            out_sq += tl.sum(b * b, axis=1)
            diff_sq += tl.sum(diff * diff, axis=1)
            out_absmax = tl.maximum(out_absmax, tl.max(tl.abs(b), axis=1))

        in_norm = tl.maximum(tl.sqrt(in_sq), EPS)
        out_norm = tl.maximum(tl.sqrt(out_sq), EPS)
        cos = dot / (in_norm * out_norm)
        rel = tl.sqrt(diff_sq) / in_norm
        tokens_acc += tl.where(is_real, 1.0, 0.0)
        one_minus_cos_acc += tl.where(is_real, 1.0 - cos, 0.0)
        rel_acc += tl.where(is_real, rel, 0.0)
        sq_acc += out_sq
        max_acc = tl.maximum(max_acc, out_absmax)

    # Nothing reads the accumulator during the kernel, so relaxed ordering is enough.
    tl.atomic_add(acc_ptr + 0, tl.sum(tokens_acc, axis=0), sem="relaxed")
    tl.atomic_add(acc_ptr + 1, tl.sum(one_minus_cos_acc, axis=0), sem="relaxed")
    tl.atomic_add(acc_ptr + 2, tl.sum(rel_acc, axis=0), sem="relaxed")
    sq_total = tl.sum(sq_acc, axis=0)
    tl.atomic_add(acc_ptr + 3, sq_total, sem="relaxed")
    # Values are >= 0, for which float max and the atomic's ordering agree.
    tl.atomic_max(acc_ptr + 4, tl.max(max_acc, axis=0), sem="relaxed")
    # A NaN in a real token of h_out is dropped by tl.maximum / tl.max on the GPU and by the float
    # atomic_max everywhere, which would leave a finite absmax where the reference gives NaN. The
    # same NaN always reaches sum_sq (b * b), so add a NaN into absmax (an add, as the interpreter has
    # no float exchange); a positive NaN's bits exceed every non-negative float's, so atomic_max
    # calls before or after keep it.
    tl.atomic_add(acc_ptr + 4, float("nan"), mask=sq_total != sq_total, sem="relaxed")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(n_tokens: int, hidden: int, itemsize: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, number of programs, num_warps) for one call."""
    if device.type == "cuda":
        block_h = min(triton.next_power_of_2(hidden), 32 * max(1, GPU_LOAD_BYTES_PER_LANE // itemsize))
        block_t = min(triton.next_power_of_2(n_tokens), GPU_ROWS_PER_WARP * GPU_NUM_WARPS)
    else:
        block_h = min(triton.next_power_of_2(hidden), INTERPRET_MAX_BLOCK_H)
        block_t = min(triton.next_power_of_2(n_tokens), max(1, INTERPRET_TILE_ELEMENTS // block_h))
    n_tiles = triton.cdiv(n_tokens, block_t)
    if device.type == "cuda":
        # At most 16 programs per SM (four waves of four resident ones); past that, programs loop
        # over more tiles, so the five same-address atomics per program stay few at any length.
        n_programs = min(n_tiles, _sm_count(device.index or 0) * GPU_PROGRAMS_PER_SM)
        return block_t, block_h, n_programs, GPU_NUM_WARPS
    return block_t, block_h, min(n_tiles, INTERPRET_MAX_PROGRAMS), 4


def _check_inputs(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None, acc: torch.Tensor) -> None:
    """Shape/dtype/device checks; they look only at metadata, never at device values."""
    if h_in.dim() != 2 or h_in.shape != h_out.shape:
        raise ValueError(
            f"hidden stats need h_in and h_out of the same shape [tokens, hidden]; got {tuple(h_in.shape)} and "
            f"{tuple(h_out.shape)}. Flatten batch and sequence first: h.reshape(-1, hidden)."
        )
    if h_in.dtype != h_out.dtype or not h_in.dtype.is_floating_point:
        raise ValueError(
            f"hidden stats need h_in and h_out of one floating dtype; got {h_in.dtype} and {h_out.dtype}."
        )
    if h_in.device != h_out.device or acc.device != h_in.device:
        raise ValueError(
            f"hidden stats need h_in, h_out and acc on one device; got {h_in.device}, {h_out.device}, {acc.device}."
        )
    if h_in.shape[1] > 1 and (h_in.stride(1) != 1 or h_out.stride(1) != 1):
        raise ValueError(
            "hidden stats need the hidden (last) dim contiguous; got strides "
            f"{h_in.stride()} and {h_out.stride()}. Call .contiguous() first."
        )
    if acc.dtype != torch.float32 or acc.shape != (NUM_STATS,) or acc.stride(0) != 1:
        raise ValueError(
            f"the accumulator must be a contiguous float32 [{NUM_STATS}] tensor, e.g. new_stats_buffer(n, device)[i]; "
            f"got {acc.dtype} {tuple(acc.shape)} with strides {acc.stride()}."
        )
    if mask is not None:
        if mask.shape != (h_in.shape[0],) or mask.device != h_in.device:
            raise ValueError(
                f"the token mask must be [tokens]=[{h_in.shape[0]}] on {h_in.device}; got {tuple(mask.shape)} on "
                f"{mask.device}. Flatten an attention mask [batch, seq] with mask.reshape(-1)."
            )
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(
                f"the token mask must be bool or integer (nonzero = real token); got {mask.dtype}. A float mask may "
                "be additive (0 = real, -inf = padding), so it is refused rather than guessed: pass mask != 0 or "
                "the integer attention_mask."
            )


def new_stats_buffer(num_layers: int, device) -> torch.Tensor:
    """A zeroed float32 accumulator ``[num_layers, 5]`` (last dim laid out as ``STAT_FIELDS``) on ``device``."""
    return torch.zeros(num_layers, NUM_STATS, dtype=torch.float32, device=device)


def hidden_stats_reference(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None, *,
                           compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """PyTorch reference: the increments one call adds to an accumulator, as a float64 ``[5]`` tensor.

    With ``a = h_in[t]``, ``b = h_out[t]`` (``[tokens, hidden]``, any float dtype), ``R`` the real
    tokens (``mask[t] != 0``; all tokens when ``mask`` is None) and eps = 1e-8::

        tokens            = |R|
        sum_one_minus_cos = sum_{t in R} 1 - dot(a, b) / (max(||a||, eps) * max(||b||, eps))
        sum_rel_change = sum_{t in R} ||b - a|| / max(||a||, eps)
        sum_sq         = sum_{t in R} sum_j b_j^2
        absmax         = max_{t in R, j} |b_j|        (0 when R is empty)

    Padded tokens are excluded with ``torch.where``, so non-finite values there do not leak in.
    ``compute_dtype`` is the precision of the per-element math (float64 by default; the in-place
    fallback of ``accumulate_hidden_stats`` uses float32, like the kernel). Returns float64 on
    ``h_in.device``; reads no device value on the host.
    """
    n_tokens = h_in.shape[0]
    if n_tokens == 0:
        return torch.zeros(NUM_STATS, dtype=torch.float64, device=h_in.device)
    a = h_in.to(compute_dtype)
    b = h_out.to(compute_dtype)
    is_real = torch.ones(n_tokens, dtype=torch.bool, device=h_in.device) if mask is None else mask != 0
    in_norm = torch.linalg.vector_norm(a, dim=-1).clamp_min(NORM_EPS)
    out_sq = (b * b).sum(-1)
    out_norm = out_sq.sqrt().clamp_min(NORM_EPS)
    cos = (a * b).sum(-1) / (in_norm * out_norm)
    rel = torch.linalg.vector_norm(b - a, dim=-1) / in_norm
    zero = torch.zeros((), dtype=compute_dtype, device=h_in.device)
    stats = torch.stack([
        is_real.sum().to(compute_dtype),
        torch.where(is_real, 1.0 - cos, zero).sum(),
        torch.where(is_real, rel, zero).sum(),
        torch.where(is_real, out_sq, zero).sum(),
        torch.where(is_real, b.abs().amax(-1), zero).amax(),
    ])
    return stats.to(torch.float64)


def accumulate_hidden_stats_reference(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None,
                                      acc: torch.Tensor) -> None:
    """PyTorch path of ``accumulate_hidden_stats``: same arguments, same in-place update of ``acc``.

    Computes in float32 like the kernel and updates ``acc`` with device ops only (no host sync).
    """
    increments = hidden_stats_reference(h_in, h_out, mask, compute_dtype=torch.float32).to(torch.float32)
    acc[:4] += increments[:4]
    torch.maximum(acc[4], increments[4], out=acc[4])


def accumulate_hidden_stats(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None,
                            acc: torch.Tensor) -> None:
    """Add one batch's statistics of a block to ``acc``, in place, in one kernel launch.

    Args:
        h_in: block input ``[tokens, hidden]``, float32/bfloat16/float16, hidden dim contiguous
            (any row stride, e.g. a slice of a wider tensor).
        h_out: block output, same shape/dtype/device as ``h_in``, hidden dim contiguous.
        mask: None (every token is real) or ``[tokens]`` bool/integer, nonzero = real token.
            Float masks are refused (they may be additive).
        acc: float32 ``[5]`` contiguous accumulator on the same device, e.g. ``buf[layer]`` of
            ``new_stats_buffer``. ``tokens``/``sum_*`` are added to, ``absmax`` is max-ed.

    Runs the Triton kernel when ``laet_fast.backend.use_triton`` says so (CUDA, or the interpreter
    on CPU), else ``accumulate_hidden_stats_reference``. Never reads device values on the host.
    The float32 token count is exact up to 2**24 tokens per accumulator.
    """
    _check_inputs(h_in, h_out, mask, acc)
    n_tokens, hidden = h_in.shape
    if n_tokens == 0 or hidden == 0:
        # An empty batch adds nothing (with hidden == 0 no token has a defined cosine).
        return
    if not use_triton(h_in, h_out, acc):
        accumulate_hidden_stats_reference(h_in, h_out, mask, acc)
        return
    block_t, block_h, n_programs, num_warps = _launch_config(n_tokens, hidden, h_in.element_size(), h_in.device)
    if mask is None:
        mask_arg, mask_stride = acc, 0  # never dereferenced: HAS_MASK=False
    else:
        # Triton loads bool as i1 from byte storage; viewing it as uint8 is free and unambiguous.
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_stride = mask.stride(0)
    with launch_device(h_in.device):
        _hidden_stats_kernel[(n_programs,)](
            h_in, h_out, mask_arg, acc,
            n_tokens, hidden, h_in.stride(0), h_out.stride(0), mask_stride,
            HAS_MASK=mask is not None, EPS=NORM_EPS, BLOCK_T=block_t, BLOCK_H=block_h,
            num_warps=num_warps, enable_fp_fusion=ENABLE_FP_FUSION,
        )


def hidden_stats_metrics(acc: torch.Tensor, hidden_size: int) -> dict[str, torch.Tensor]:
    """Per-layer metrics from an accumulator ``acc`` of shape ``[..., 5]`` (float32 or float64).

    Returns ``block_influence`` (1 - mean cos), ``relative_change`` (mean ||b - a|| / ||a||),
    ``act_rms`` (sqrt(sum_sq / (tokens * hidden_size))) and ``act_absmax``, each of shape
    ``[...]`` in ``acc``'s dtype and on its device. Layers that saw no token get NaN.
    """
    if acc.shape[-1] != NUM_STATS:
        raise ValueError(f"accumulator last dim must be {NUM_STATS} ({', '.join(STAT_FIELDS)}); "
                         f"got {tuple(acc.shape)}.")
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be positive; got {hidden_size}.")
    tokens, sum_one_minus_cos, sum_rel, sum_sq, absmax = acc.unbind(-1)
    has_tokens = tokens > 0
    nan = torch.full((), float("nan"), dtype=acc.dtype, device=acc.device)
    safe_tokens = torch.where(has_tokens, tokens, torch.ones_like(tokens))
    return {
        "block_influence": torch.where(has_tokens, sum_one_minus_cos / safe_tokens, nan),
        "relative_change": torch.where(has_tokens, sum_rel / safe_tokens, nan),
        "act_rms": torch.where(has_tokens, torch.sqrt(sum_sq / (safe_tokens * hidden_size)), nan),
        "act_absmax": torch.where(has_tokens, absmax, nan),
    }

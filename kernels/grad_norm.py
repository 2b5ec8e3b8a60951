"""Per-layer gradient norms for IR-Tuning style layer selection.

Two kinds of layers need a squared gradient norm each step:

* Trainable blocks have real ``.grad`` tensors. :func:`grouped_sq_norms` reads every gradient once
  in one fused multi-tensor launch per dtype and adds each tensor's sum of squares into its block's
  slot of a float32 device buffer, with no host synchronisation.
* Frozen linear layers have no ``.grad``. The norm their weight gradient would have is
  ``||dW||_F^2 = ||X^T dY||_F^2`` for the layer input ``X [T, in]`` and output gradient ``dY [T, out]``.
  :func:`linear_grad_sq_norm` computes it without materialising the ``[in, out]`` matrix, either

  - "tiled": form ``X^T dY`` tile by tile (``tl.dot`` over the token dimension) and reduce the squares
    of each tile in the epilogue, costing ``2 * T * in * out`` flops, or
  - "gram": use ``||X^T dY||_F^2 = <X X^T, dY dY^T>_F``, formed tile by tile over token pairs
    (only the upper triangle, the Gram matrices being symmetric), costing ``T^2 * (in + out)`` flops.

  "auto" picks the lower of the two flop counts weighted by the kernels' estimated throughputs
  (:func:`method_costs`): "gram" for few tokens. Tile sizes follow from the shape; nothing is
  autotuned, so no call benchmarks in the middle of a backward pass.

Weight layout does not matter: an ``nn.Linear`` weight ``[out, in]`` and a GPT-2 ``Conv1D`` weight
``[in, out]`` have the same Frobenius norm of their gradient.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from laet_fast.backend import TRITON_INTERPRET, launch_device, use_triton, tl, triton


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Pinned, not left to Triton's default (which turns off in 3.10): the grouped sums of squares and the
# tiles' epilogues are multiply-adds, and fused each term rounds once instead of twice (float32
# tl.dot emits its FMAs either way).
ENABLE_FP_FUSION = True


def _tl_dtype(dtype: torch.dtype):
    """Triton's dtype of the same name (``torch.bfloat16`` -> ``tl.bfloat16``), for a kernel's constexpr."""
    return getattr(tl, str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------------------------------------
# Multi-tensor grouped sum of squares
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grouped_sq_norm_kernel(
    tensor_table_ptr,  # int64 [3, N]: address, numel, group of each tensor
    chunk_table_ptr,  # int64 [P]: (tensor index << 32) | chunk index within that tensor
    out_ptr,  # float32 [G]
    num_tensors,
    DTYPE: tl.constexpr,
    PTR_ALIGN: tl.constexpr,  # bytes every tensor address is a multiple of
    BLOCK: tl.constexpr,
    BLOCKS_PER_CHUNK: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * BLOCKS_PER_CHUNK
    entry = tl.load(chunk_table_ptr + tl.program_id(0))
    tensor = entry >> 32
    chunk = entry - (tensor << 32)
    address = tl.load(tensor_table_ptr + tensor)
    numel = tl.load(tensor_table_ptr + num_tensors + tensor)
    group = tl.load(tensor_table_ptr + 2 * num_tensors + tensor)
    base = address.to(tl.pointer_type(DTYPE))

    start = chunk * CHUNK
    length = tl.minimum(numel - start, CHUNK)
    full_blocks = length // BLOCK
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Full blocks need no mask; only the last, partial block of a tensor is masked. A pointer made
    # from an integer carries no alignment, so state it: each block starts PTR_ALIGN-aligned
    # (BLOCK-element steps from an aligned address), which lets the loads vectorise to 16 bytes.
    for b in range(0, full_blocks):
        block_ptrs = tl.multiple_of(base + start + b * BLOCK + offsets, PTR_ALIGN)
        values = tl.load(block_ptrs).to(tl.float32)
        acc += values * values
    tail = start + full_blocks * BLOCK + offsets
    values = tl.load(base + tail, mask=tail < start + length, other=0.0).to(tl.float32)
    acc += values * values
    tl.atomic_add(out_ptr + group, tl.sum(acc, axis=0))


def _grouped_sq_norm_config() -> tuple[int, int, int]:
    """(BLOCK, BLOCKS_PER_CHUNK, num_warps): 64Ki-element chunks on GPU, small ones when interpreting."""
    if TRITON_INTERPRET:
        return 512, 4, 4
    return 4096, 16, 8


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on ``device``: through pinned memory with non_blocking on CUDA, so that it
    reaches the GPU without a host synchronisation (a kernel cannot read pageable host memory)."""
    if device.type == "cpu":
        return table
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def _launch_grouped_sq_norms(tensors: list[torch.Tensor], groups: list[int], out: torch.Tensor) -> None:
    """One launch for tensors that share a dtype; each program reduces one chunk of one tensor."""
    block, blocks_per_chunk, num_warps = _grouped_sq_norm_config()
    chunk = block * blocks_per_chunk
    addresses = [t.data_ptr() for t in tensors]
    # 16-byte alignment (true for fresh allocations) allows 16-byte loads; otherwise claim only
    # the element size, which every tensor start satisfies.
    ptr_align = 16 if all(a % 16 == 0 for a in addresses) else tensors[0].element_size()
    numels = [t.numel() for t in tensors]
    chunks = [triton.cdiv(n, chunk) for n in numels]
    num_tensors = len(tensors)

    tensor_table = torch.tensor([addresses, numels, groups], dtype=torch.int64)
    counts = torch.tensor(chunks, dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(num_tensors, dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_index = torch.arange(int(counts.sum()), dtype=torch.int64) - first_chunk[tensor_index]
    chunk_table = (tensor_index << 32) | chunk_index

    _grouped_sq_norm_kernel[(chunk_table.numel(),)](
        _to_device(tensor_table, out.device),
        _to_device(chunk_table, out.device),
        out,
        num_tensors,
        DTYPE=_tl_dtype(tensors[0].dtype),
        PTR_ALIGN=ptr_align,
        BLOCK=block,
        BLOCKS_PER_CHUNK=blocks_per_chunk,
        num_warps=num_warps,
        enable_fp_fusion=ENABLE_FP_FUSION,
    )


def _check_grouped_args(tensors: Sequence[torch.Tensor], groups: Sequence[int], out: torch.Tensor) -> None:
    if len(tensors) != len(groups):
        raise ValueError(f"grouped_sq_norms got {len(tensors)} tensors but {len(groups)} group ids; "
                         "pass one id per tensor.")
    if out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous():
        raise ValueError(
            f"grouped_sq_norms needs `out` to be a contiguous 1-D float32 tensor, got {out.dtype} of shape "
            f"{tuple(out.shape)}; allocate it with torch.zeros(num_groups, dtype=torch.float32, device=...)."
        )
    bad = [g for g in groups if not 0 <= int(g) < out.numel()]
    if bad:
        raise ValueError(f"grouped_sq_norms got group ids {bad[:5]} outside [0, {out.numel()}); "
                         "`out` has one slot per group.")
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"grouped_sq_norms supports float32/bfloat16/float16/float64 tensors, got {t.dtype}.")
        if t.device != out.device:
            raise ValueError(f"grouped_sq_norms got a tensor on {t.device} but `out` on {out.device}; "
                             "put them on one device.")


def grouped_sq_norms(tensors: Sequence[torch.Tensor], groups: Sequence[int], out: torch.Tensor) -> None:
    """Accumulate per-group sums of squares: ``out[groups[i]] += sum(tensors[i].float() ** 2)``.

    Args:
        tensors: tensors of any shape, float32 / bfloat16 / float16 (float64 also accepted), on
            ``out``'s device; dtypes may differ. A non-contiguous tensor is copied with
            ``.contiguous()`` first (an extra read and write of that tensor only).
        groups: one group id (Python int in ``[0, G)``) per tensor, e.g. the block index.
        out: float32 ``[G]``, contiguous; updated in place.

    Each tensor is read once. On the Triton path there is one kernel launch per distinct dtype, the
    partial sums are accumulated in float32 and added atomically (so the summation order, and the
    last bits, vary between runs). Nothing synchronises with the host.
    """
    _check_grouped_args(tensors, groups, out)
    pairs = [(t if t.is_contiguous() else t.contiguous(), int(g)) for t, g in zip(tensors, groups) if t.numel() > 0]
    if not pairs:
        return
    # The interpreter runs on host copies of the tensor arguments, but this kernel reads raw
    # addresses from its table: under TRITON_INTERPRET=1, CUDA addresses would be read on the host.
    if not use_triton(out, *(t for t, _ in pairs)) or (TRITON_INTERPRET and out.device.type != "cpu"):
        _grouped_sq_norms_torch(pairs, out)
        return
    by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, int]]] = {}
    for t, g in pairs:
        by_dtype.setdefault(t.dtype, []).append((t, g))
    with launch_device(out.device):
        for members in by_dtype.values():
            _launch_grouped_sq_norms([t for t, _ in members], [g for _, g in members], out)


# Elements per partial sum on the PyTorch path: bounds the float32 temporary of ``.square()`` (4 MiB).
_TORCH_SUM_CHUNK = 1 << 20


@torch.no_grad()
def _grouped_sq_norms_torch(pairs: list[tuple[torch.Tensor, int]], out: torch.Tensor) -> None:
    """PyTorch path of :func:`grouped_sq_norms`: per tensor, float32 ``square().sum()`` over chunks
    of ``_TORCH_SUM_CHUNK`` elements, then ``index_add_`` into ``out``; no host synchronisation.

    Not ``torch._foreach_norm`` nor ``torch.linalg.vector_norm``: on CPU they accumulate float32
    without cascade summation and come out biased low (-9e-3 relative on a 4096x14336 tensor,
    against ~6e-8 here), which would under-score trainable blocks beside exactly scored frozen ones.
    """
    sums = []
    for t, _ in pairs:
        parts = [chunk.float().square().sum() for chunk in t.reshape(-1).split(_TORCH_SUM_CHUNK)]
        sums.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum())
    index = _to_device(torch.tensor([g for _, g in pairs], dtype=torch.int64), out.device)
    out.index_add_(0, index, torch.stack(sums))


@torch.no_grad()
def accumulate_sq_norm(t: torch.Tensor, out: torch.Tensor) -> None:
    """``out += sum(t.float() ** 2)`` for one tensor of any shape and float dtype, on ``out``'s device.

    For one tensor at a time (a gradient that exists only inside a hook): no host-side tables, no
    pinned copies, nothing read back; on CUDA two device ops (``torch.linalg.vector_norm`` in
    float32, which reduces as a tree there, then ``addcmul_``). On CPU, where that norm is biased low
    (no cascade summation), the chunked float32 sum of :func:`grouped_sq_norms`' PyTorch path.
    ``out``: a float32 one-element tensor, e.g. ``buf[i:i+1]``.
    """
    if out.dtype != torch.float32 or out.numel() != 1 or t.device != out.device:
        raise ValueError(f"accumulate_sq_norm needs a one-element float32 `out` on {t.device}; got {out.dtype} "
                         f"with {out.numel()} elements on {out.device}.")
    if t.numel() == 0:
        return
    if t.device.type == "cuda":
        norm = torch.linalg.vector_norm(t, dtype=torch.float32)
        out.addcmul_(norm, norm)
    else:
        _grouped_sq_norms_torch([(t, 0)], out)


def grouped_sq_norms_reference(tensors: Sequence[torch.Tensor], groups: Sequence[int], num_groups: int) -> torch.Tensor:
    """Reference for :func:`grouped_sq_norms`: ``result[g] = sum_{i: groups[i] = g} sum(tensors[i] ** 2)``.

    Computed in float64, one tensor at a time. Returns float64 ``[num_groups]`` on the tensors'
    device (CPU when there are none).
    """
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    result = torch.zeros(num_groups, dtype=torch.float64, device=device)
    for t, g in zip(tensors, groups):
        result[int(g)] += t.detach().double().pow(2).sum()
    return result


# ---------------------------------------------------------------------------------------------
# Frozen linear layers: ||X^T dY||_F^2 without the [in, out] matrix
# ---------------------------------------------------------------------------------------------


@triton.jit
def _xt_dy_sq_norm_tiled_kernel(
    x_ptr,  # [T, IN]
    dy_ptr,  # [T, OUT]
    out_ptr,  # float32 [1]
    T,
    IN,
    OUT,
    stride_xt,
    stride_xi,
    stride_dyt,
    stride_dyo,
    BLOCK_T: tl.constexpr,
    BLOCK_IN: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    GROUP_IN: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program ``pid`` forms one ``[BLOCK_IN, BLOCK_OUT]`` tile of ``X^T dY`` over all tokens and adds
    the sum of its squares to ``out``.

    Spills: with ``x`` float32 and ``dy`` bfloat16/float16 (mixed dtypes, read as float32 on the FMA
    path) ptxas needs more than 255 registers at the float32 configuration's 3 stages and spills
    about 0.5 KiB per thread on sm_80/89/90 (benchmarks/results/aot_compile.md; 1 stage would not
    spill). Mixed dtypes are the documented slow path, which ``GradNormRecorder`` avoids by passing
    both in the compute dtype, so the spill is accepted there rather than given its own configuration.
    Triton 3.6 also spills 8 bytes at the 64x64 bf16/fp16 tiles on sm_89 (Triton 3.9 does not).
    """
    # Programs that run together share X column tiles: walk GROUP_IN row-tiles of the output
    # before moving to the next output column tile, so that X and dY tiles are reused from L2.
    pid = tl.program_id(0)
    tiles_in = tl.cdiv(IN, BLOCK_IN)
    tiles_out = tl.cdiv(OUT, BLOCK_OUT)
    per_group = GROUP_IN * tiles_out
    first_in = (pid // per_group) * GROUP_IN
    group_size = tl.minimum(tiles_in - first_in, GROUP_IN)
    pid_in = first_in + (pid % per_group) % group_size
    pid_out = (pid % per_group) // group_size

    offs_in = pid_in * BLOCK_IN + tl.arange(0, BLOCK_IN)
    offs_out = pid_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_t = tl.arange(0, BLOCK_T)
    x_ptrs = x_ptr + offs_in[:, None].to(tl.int64) * stride_xi + offs_t[None, :].to(tl.int64) * stride_xt
    dy_ptrs = dy_ptr + offs_t[:, None].to(tl.int64) * stride_dyt + offs_out[None, :].to(tl.int64) * stride_dyo
    in_mask = offs_in < IN
    out_mask = offs_out < OUT

    acc = tl.zeros([BLOCK_IN, BLOCK_OUT], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t_mask = offs_t + t0 < T
        x_tile = tl.load(x_ptrs, mask=in_mask[:, None] & t_mask[None, :], other=0.0).to(DOT_DTYPE)
        dy_tile = tl.load(dy_ptrs, mask=t_mask[:, None] & out_mask[None, :], other=0.0).to(DOT_DTYPE)
        if IEEE:
            acc = tl.dot(x_tile, dy_tile, acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, dy_tile, acc)
        x_ptrs += BLOCK_T * stride_xt
        dy_ptrs += BLOCK_T * stride_dyt
    # Epilogue: only the tile's sum of squares leaves the program.
    tl.atomic_add(out_ptr, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _gram_sq_norm_kernel(
    x_ptr,  # [T, IN]
    dy_ptr,  # [T, OUT]
    out_ptr,  # float32 [1]
    T,
    IN,
    OUT,
    stride_xt,
    stride_xi,
    stride_dyt,
    stride_dyo,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Program (s, t) forms the [BLOCK_T, BLOCK_T] tiles of X X^T and dY dY^T for token tiles s and t
    # and adds sum(G_x * G_dy). Both Gram matrices are symmetric: only s <= t is computed and
    # off-diagonal tiles count twice.
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    if pid_s <= pid_t:
        rows_s = pid_s * BLOCK_T + tl.arange(0, BLOCK_T)
        rows_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_s = rows_s < T
        mask_t = rows_t < T
        offs_k = tl.arange(0, BLOCK_K)

        gram_x = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
        xs_ptrs = x_ptr + rows_s[:, None].to(tl.int64) * stride_xt + offs_k[None, :].to(tl.int64) * stride_xi
        xt_ptrs = x_ptr + offs_k[:, None].to(tl.int64) * stride_xi + rows_t[None, :].to(tl.int64) * stride_xt
        for k0 in range(0, IN, BLOCK_K):
            k_mask = offs_k + k0 < IN
            xs = tl.load(xs_ptrs, mask=mask_s[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
            xt = tl.load(xt_ptrs, mask=k_mask[:, None] & mask_t[None, :], other=0.0).to(DOT_DTYPE)
            if IEEE:
                gram_x = tl.dot(xs, xt, gram_x, input_precision="ieee")
            else:
                gram_x = tl.dot(xs, xt, gram_x)
            xs_ptrs += BLOCK_K * stride_xi
            xt_ptrs += BLOCK_K * stride_xi

        gram_dy = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
        ds_ptrs = dy_ptr + rows_s[:, None].to(tl.int64) * stride_dyt + offs_k[None, :].to(tl.int64) * stride_dyo
        dt_ptrs = dy_ptr + offs_k[:, None].to(tl.int64) * stride_dyo + rows_t[None, :].to(tl.int64) * stride_dyt
        for k0 in range(0, OUT, BLOCK_K):
            k_mask = offs_k + k0 < OUT
            ds = tl.load(ds_ptrs, mask=mask_s[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
            dt = tl.load(dt_ptrs, mask=k_mask[:, None] & mask_t[None, :], other=0.0).to(DOT_DTYPE)
            if IEEE:
                gram_dy = tl.dot(ds, dt, gram_dy, input_precision="ieee")
            else:
                gram_dy = tl.dot(ds, dt, gram_dy)
            ds_ptrs += BLOCK_K * stride_dyo
            dt_ptrs += BLOCK_K * stride_dyo

        weight = tl.where(pid_s < pid_t, 2.0, 1.0)
        tl.atomic_add(out_ptr, weight * tl.sum(tl.sum(gram_x * gram_dy, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------
# Launch configuration: a shape rule, never autotuning
# ---------------------------------------------------------------------------------------------
# The autotuner would benchmark its candidates at the first call of each new shape, i.e. in the
# middle of a backward pass: it synchronises and allocates Triton's 256 MiB benchmark buffer (more
# than a 4096x14336 bf16 weight). So each kernel takes its configuration from the shape: the
# largest tile that still gives every SM a program, a smaller one when the matrix is too small for
# that. The candidates are among those the autotuner used to choose from;
# benchmarks/test_bench_grad_norm.py times them all on a GPU and records which one the rule took.
# Tiled: (BLOCK_IN, BLOCK_OUT, BLOCK_T, num_warps, num_stages), largest first.
TILED_CONFIGS_TENSOR_CORES = ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4))
# Float32 operands take the FMA path (IEEE, no TF32), where large tiles cost minutes of
# compilation for nothing.
TILED_CONFIGS_FMA = ((64, 64, 32, 4, 3),)
# Gram: (BLOCK_T, BLOCK_K, num_warps, num_stages), largest first.
GRAM_CONFIGS_TENSOR_CORES = ((64, 64, 4, 4), (32, 64, 4, 4))
GRAM_CONFIGS_FMA = ((32, 32, 4, 3),)

# "auto" weighs flops by throughput. The tiled kernel is a plain matmul (wgmma on Hopper, ~85
# flop/byte at 128x128x64 tiles); the Gram kernel has no split over the hidden dims, uses mma.sync
# and runs at 16-64 flop/byte, so per flop it is estimated at half the tiled kernel's speed on the
# tensor cores, and equal on the float32 FMA path. A documented estimate, not a measurement: the
# grad_norm_frozen benchmark records both kernels' times beside the rule's inputs, to correct it.
GRAM_RELATIVE_THROUGHPUT = {True: 0.5, False: 1.0}
# SMs assumed when no CUDA device is at hand (CPU, interpreter): an H100's 132.
DEFAULT_SM_COUNT = 132


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int:
    return _sm_count(device.index or 0) if device.type == "cuda" else DEFAULT_SM_COUNT


def tiled_config(d_in: int, d_out: int, tensor_cores: bool, sm_count: int = DEFAULT_SM_COUNT) -> dict:
    """Launch meta-parameters of the tiled kernel for an ``[in, out]`` product: the largest tile
    that still gives every SM a program (the smallest candidate when none does)."""
    if TRITON_INTERPRET:
        return dict(BLOCK_IN=32, BLOCK_OUT=64, BLOCK_T=32, GROUP_IN=2, num_warps=4)
    candidates = TILED_CONFIGS_TENSOR_CORES if tensor_cores else TILED_CONFIGS_FMA
    for bi, bo, bt, warps, stages in candidates:
        if triton.cdiv(d_in, bi) * triton.cdiv(d_out, bo) >= sm_count:
            break
    return dict(BLOCK_IN=bi, BLOCK_OUT=bo, BLOCK_T=bt, GROUP_IN=8, num_warps=warps, num_stages=stages)


def _gram_programs(tokens: int, block_t: int) -> int:
    """Programs of the Gram kernel that do work: the upper triangle of the token-tile grid."""
    tiles = triton.cdiv(tokens, block_t)
    return tiles * (tiles + 1) // 2


def gram_config(tokens: int, tensor_cores: bool, sm_count: int = DEFAULT_SM_COUNT) -> dict:
    """Launch meta-parameters of the Gram kernel: the largest token tile that still fills the SMs."""
    if TRITON_INTERPRET:
        return dict(BLOCK_T=32, BLOCK_K=64, num_warps=4)
    candidates = GRAM_CONFIGS_TENSOR_CORES if tensor_cores else GRAM_CONFIGS_FMA
    for bt, bk, warps, stages in candidates:
        if _gram_programs(tokens, bt) >= sm_count:
            break
    return dict(BLOCK_T=bt, BLOCK_K=bk, num_warps=warps, num_stages=stages)


_METHODS = ("auto", "tiled", "gram")


def method_costs(tokens: int, d_in: int, d_out: int, tensor_cores: bool = True,
                 sm_count: int = DEFAULT_SM_COUNT) -> dict:
    """The "auto" rule's inputs and choice for ``x [tokens, in]``, ``dy [tokens, out]`` (a dict the
    benchmarks record).

    Flops: ``2 T in out`` for "tiled", ``T^2 (in + out)`` for "gram" (upper triangles only). Each is
    divided by the fraction of the SMs the kernel's grid occupies (a small layer, or a few token
    tiles, cannot fill a GPU), and the Gram one by ``GRAM_RELATIVE_THROUGHPUT``. "gram" when its
    cost is the lower.
    """
    relative = GRAM_RELATIVE_THROUGHPUT[tensor_cores]
    tiled_meta = tiled_config(d_in, d_out, tensor_cores, sm_count)
    tiled_programs = triton.cdiv(d_in, tiled_meta["BLOCK_IN"]) * triton.cdiv(d_out, tiled_meta["BLOCK_OUT"])
    gram_programs = _gram_programs(tokens, gram_config(tokens, tensor_cores, sm_count)["BLOCK_T"])
    tiled_occupancy = min(1.0, tiled_programs / sm_count)
    gram_occupancy = min(1.0, gram_programs / sm_count)
    tiled = 2.0 * tokens * d_in * d_out / tiled_occupancy
    gram = tokens * tokens * (d_in + d_out) / (relative * gram_occupancy) if tokens else 0.0
    return {"tokens": tokens, "in": d_in, "out": d_out, "tensor_cores": tensor_cores, "sm_count": sm_count,
            "gram_relative_throughput": relative, "tiled_occupancy": tiled_occupancy,
            "gram_occupancy": gram_occupancy, "tiled_cost": tiled, "gram_cost": gram,
            "choice": "gram" if gram < tiled else "tiled"}


def _choose_method(method: str, tokens: int, d_in: int, d_out: int, tensor_cores: bool = True,
                   sm_count: int = DEFAULT_SM_COUNT) -> str:
    if method not in _METHODS:
        raise ValueError(f"linear_grad_sq_norm: unknown method {method!r}; use one of {_METHODS}.")
    if method != "auto":
        return method
    return method_costs(tokens, d_in, d_out, tensor_cores, sm_count)["choice"]


def _flatten_tokens(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 1 or dy.dim() < 1 or x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(
            f"linear_grad_sq_norm needs x [..., in] and dy [..., out] with the same leading dims, got "
            f"{tuple(x.shape)} and {tuple(dy.shape)}."
        )
    return x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])


def _dot_dtype(x: torch.Tensor, dy: torch.Tensor):
    """tl.dot's operand dtype: the inputs' own when they share a half dtype (tensor cores), else
    float32 (FMA, IEEE). bf16 arithmetic, tl.dot included, is wrong under the interpreter."""
    if x.dtype == dy.dtype and not (TRITON_INTERPRET and x.dtype == torch.bfloat16):
        return _tl_dtype(x.dtype)
    return tl.float32


def linear_grad_sq_norm(x: torch.Tensor, dy: torch.Tensor, out: torch.Tensor, method: str = "auto") -> None:
    """Accumulate the squared Frobenius norm of a linear layer's weight gradient without forming it.

    ``out += ||x^T dy||_F^2`` where ``x`` is flattened to ``[T, in]`` and ``dy`` to ``[T, out]``.

    Args:
        x: layer input ``[..., in]``, float32 / bfloat16 / float16.
        dy: gradient of the layer output ``[..., out]``, same leading dims, float32 / bfloat16 / float16.
            When the dtypes differ both are read as float32, off the tensor cores (10-20x slower on
            Hopper): pass both in the compute dtype, as ``GradNormRecorder`` does under autocast.
        out: float32 one-element tensor, e.g. ``buf[i:i+1]``; updated in place.
        method: "tiled" (X^T dY tile by tile), "gram" (<X X^T, dY dY^T>), or "auto" (the lower of
            their flop counts weighted by the kernels' throughputs, see :func:`method_costs`).

    Products accumulate in float32 (bfloat16/float16 operands go to the tensor cores on GPU; float32
    operands use full IEEE precision, not TF32). No ``[in, out]`` tensor is allocated, nothing
    synchronises with the host, and nothing is benchmarked: tile sizes follow from the shape.
    """
    if out.dtype != torch.float32 or out.numel() != 1:
        raise ValueError(
            f"linear_grad_sq_norm needs `out` to be a one-element float32 tensor (e.g. buf[i:i+1]), got "
            f"{out.dtype} with {out.numel()} elements."
        )
    for name, t in (("x", x), ("dy", dy)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"linear_grad_sq_norm supports float32/bfloat16/float16 {name}, got {t.dtype}.")
    if x.device != out.device or dy.device != out.device:
        raise ValueError(
            f"linear_grad_sq_norm needs x, dy and out on one device, got {x.device}, {dy.device} and {out.device}."
        )
    x2, dy2 = _flatten_tokens(x, dy)
    tokens, d_in = x2.shape
    d_out = dy2.shape[1]
    dot_dtype = _dot_dtype(x2, dy2)
    tensor_cores = dot_dtype != tl.float32
    sm_count = _device_sm_count(out.device)
    chosen = _choose_method(method, tokens, d_in, d_out, tensor_cores, sm_count)
    if tokens == 0 or d_in == 0 or d_out == 0:
        return
    if not use_triton(x2, dy2, out):
        out.add_(_linear_grad_sq_norm_torch(x2, dy2, chosen).reshape(out.shape))
        return
    if chosen == "tiled":
        config = tiled_config(d_in, d_out, tensor_cores, sm_count)
    else:
        config = gram_config(tokens, tensor_cores, sm_count)
    launch_linear_kernel(x2, dy2, out, chosen, config)


def launch_linear_kernel(x2: torch.Tensor, dy2: torch.Tensor, out: torch.Tensor, method: str, config: dict) -> None:
    """One launch of the "tiled" or "gram" kernel on ``x2 [T, in]``, ``dy2 [T, out]`` with the given
    meta-parameters (as ``tiled_config`` / ``gram_config`` return them). No checks: for
    :func:`linear_grad_sq_norm` and for benchmarks that time each candidate configuration."""
    tokens, d_in = x2.shape
    d_out = dy2.shape[1]
    dot_dtype = _dot_dtype(x2, dy2)
    common = dict(stride_xt=x2.stride(0), stride_xi=x2.stride(1), stride_dyt=dy2.stride(0),
                  stride_dyo=dy2.stride(1), DOT_DTYPE=dot_dtype, IEEE=dot_dtype == tl.float32,
                  enable_fp_fusion=ENABLE_FP_FUSION)
    with launch_device(out.device):
        if method == "tiled":
            grid = (triton.cdiv(d_in, config["BLOCK_IN"]) * triton.cdiv(d_out, config["BLOCK_OUT"]),)
            _xt_dy_sq_norm_tiled_kernel[grid](x2, dy2, out, tokens, d_in, d_out, **common, **config)
        else:
            tiles = triton.cdiv(tokens, config["BLOCK_T"])
            _gram_sq_norm_kernel[(tiles, tiles)](x2, dy2, out, tokens, d_in, d_out, **common, **config)


# Column chunks of the PyTorch "tiled" path: a chunk of X^T dY has at most _TORCH_CHUNK_ELEMENTS
# elements and at most 1/_TORCH_MIN_CHUNKS of [in, out]. A chunk and its square exist at once, so
# the peak is 2/16 = 0.125x a float32 [in, out] gradient (measured in tests/test_grad_norm_kernels).
_TORCH_CHUNK_ELEMENTS = 1 << 22
_TORCH_MIN_CHUNKS = 16


@torch.no_grad()
def _linear_grad_sq_norm_torch(x: torch.Tensor, dy: torch.Tensor, method: str) -> torch.Tensor:
    """PyTorch path of :func:`linear_grad_sq_norm` on ``x [T, in]``, ``dy [T, out]``; float32 scalar.

    "gram": ``sum((X X^T) * (dY dY^T))`` with two ``[T, T]`` matmuls. "tiled": ``X^T dY`` in column
    chunks (see ``_TORCH_MIN_CHUNKS``): besides float32 copies of bf16/fp16 inputs (x whole, dy one
    column chunk at a time), the peak stays at 1/8 of a float32 ``[in, out]`` matrix.
    """
    x32 = x.float()
    if method == "gram":
        dy32 = dy.float()
        return ((x32 @ x32.T) * (dy32 @ dy32.T)).sum()
    d_in, d_out = x.shape[1], dy.shape[1]
    columns = max(1, min(d_out // _TORCH_MIN_CHUNKS, _TORCH_CHUNK_ELEMENTS // d_in))
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, d_out, columns):
        # A column slice of a row-major dy is a valid BLAS operand (row stride = out): no copy in fp32.
        total += (x32.T @ dy[:, start:start + columns].float()).square().sum()
    return total


def linear_grad_sq_norm_reference(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`linear_grad_sq_norm`: ``sum((x^T dy) ** 2)`` in float64.

    ``x [..., in]`` and ``dy [..., out]`` are flattened over the leading dims. Materialises the
    ``[in, out]`` matrix; for tests only. Returns a float64 scalar tensor.
    """
    x2, dy2 = _flatten_tokens(x, dy)
    return (x2.double().T @ dy2.double()).pow(2).sum()

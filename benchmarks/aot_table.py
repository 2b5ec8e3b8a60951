"""Compile every Triton kernel of laet_fast for real GPUs, without a GPU, and tabulate what ptxas made.

    python benchmarks/aot_table.py [--out-dir benchmarks/results] [--name aot_compile]

For sm_80 (A100), sm_89 (RTX 4090) and sm_90 (H100), each kernel in ``kernels/`` is compiled ahead
of time (``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``; Triton's compiler and the
``ptxas`` it ships need no GPU) with every launch configuration its launcher picks at the shapes of
SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B (sequences of 1024 tokens, batch 1..8):

* the configurations come from the launchers' own config functions, called with the target's SM
  count, and the launch arguments are those the launchers pass (dtype constexprs, strides, tile
  sizes, ``num_warps``/``num_stages``, the pinned ``enable_fp_fusion``);
* Triton's JIT turns those arguments into the compiled signature (pointer dtypes, constexpr and
  16-divisible integers) exactly as a launch on a GPU would;
* dtypes: every float dtype the public functions take on the GPU, every pair of them where two
  operands may differ (``linear_grad_sq_norm``'s x and dy, ``slerp``'s a and b), and each with and
  without a mask: an int64 attention mask, and a bool one for bf16 (other integer masks change the
  width of one load only).

Identical compiles (kernel, signature, constexprs, options) are made once. Per kernel x target x
configuration the table gives registers per thread and spilled bytes (from ptxas' own report),
shared memory, and the occupancy those allow (``occupancy``). Writes ``<name>.json`` (with the
Triton and PyTorch versions and the date) and ``<name>.md`` into ``--out-dir``, and exits with
status 1 when a kernel fails to compile, spills without a docstring line starting ``Spills:`` that
says why, or cannot be resident on an SM. Run it without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature

from bench_utils import RESULTS_DIR, device_info
from laet_fast.atomic import write_text
from laet_fast.backend import TRITON_INTERPRET
from laet_fast.kernels import grad_norm, hidden_stats, pooling, slerp
from laet_fast.memory import MODEL_SHAPES

MODELS = ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b")
SEQ_LEN = 1024
BATCH_SIZES = (1, 2, 4, 8)
HALF_DTYPES = (torch.bfloat16, torch.float16)
# Main-operand dtypes the public functions take on the GPU (see their docstrings).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPILL_NOTE = "Spills:"


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resource limits of one compute capability.

    Source: CUDA C++ Programming Guide (12.x), "Features and Technical Specifications", table
    "Technical Specifications per Compute Capability" (columns 8.0, 8.9, 9.0), and its sections on
    shared memory for compute capability 8.x and 9.0 (1 KiB of shared memory per block reserved for
    the system). Allocation granularities: CUDA's occupancy calculator, ``cuda_occupancy.h``
    (registers per warp in units of 256, shared memory in units of 128 bytes, registers split over
    the SM's 4 sub-partitions).
    """

    gpu: str
    sm_count: int  # of that GPU (A100 SXM 108, RTX 4090 128, H100 SXM 132): the launchers' grids use it
    smem_per_sm: int  # bytes
    smem_per_block: int  # bytes, the opt-in maximum of one block
    max_warps_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers, per warp
    smem_alloc_unit: int = 128  # bytes
    smem_reserved_per_block: int = 1024  # bytes
    sub_partitions: int = 4


TARGETS = {
    80: SmLimits("A100", 108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024, max_warps_per_sm=64,
                 max_blocks_per_sm=32),
    89: SmLimits("RTX 4090", 128, smem_per_sm=100 * 1024, smem_per_block=99 * 1024, max_warps_per_sm=48,
                 max_blocks_per_sm=24),
    90: SmLimits("H100", 132, smem_per_sm=228 * 1024, smem_per_block=227 * 1024, max_warps_per_sm=64,
                 max_blocks_per_sm=32),
}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(regs: int, smem: int, num_warps: int, limits: SmLimits) -> dict:
    """Blocks (programs) of ``num_warps`` warps resident per SM, given registers per thread and shared
    memory per block (bytes), and which resource limits it. 0 blocks: the kernel cannot launch."""
    regs_per_warp = _round_up(max(regs, 1) * 32, limits.reg_alloc_unit)
    warps_by_regs = (limits.regs_per_sm // limits.sub_partitions // regs_per_warp) * limits.sub_partitions
    by = {
        "blocks": limits.max_blocks_per_sm,
        "warps": limits.max_warps_per_sm // num_warps,
        "registers": 0 if regs > limits.max_regs_per_thread else warps_by_regs // num_warps,
        "shared memory": (0 if smem > limits.smem_per_block else
                          limits.smem_per_sm // (_round_up(smem, limits.smem_alloc_unit)
                                                 + limits.smem_reserved_per_block)),
    }
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "warps"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / limits.max_warps_per_sm, "limited_by": limiter}


@dataclass
class Launch:
    """One launch as a launcher makes it: the kernel, its arguments (``MockTensor`` for tensors) and
    keyword arguments (constexprs and compile options), and where it comes from."""

    kernel_name: str
    kernel: object
    args: tuple
    kwargs: dict
    label: str  # dtypes and variant, e.g. "bf16, int64 mask"
    shape: str  # the model shape that picks it ("any" when the configuration depends on none)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
            torch.int64: "int64", torch.uint8: "bool"}[dtype]


def _tensor(dtype: torch.dtype) -> MockTensor:
    """A tensor argument for the JIT's specialization: its dtype, at a 16-byte aligned address."""
    return MockTensor(dtype)


def _cuda_sm_count(sm_count: int):
    """Stand-in for a launcher's ``_sm_count(device_index)`` on the target GPU."""
    return lambda device_index: sm_count


_CUDA = torch.device("cuda", 0)


def _model_dims(name: str) -> dict:
    shape = MODEL_SHAPES[name]
    kv_width = shape["num_key_value_heads"] * shape["head_dim"]
    hidden, intermediate = shape["hidden_size"], shape["intermediate_size"]
    return {"hidden": hidden, "intermediate": intermediate, "vocab": shape["vocab_size"],
            # (in, out) of each linear layer of a block: q, k/v, o, gate/up, down.
            "linears": ((hidden, hidden), (hidden, kv_width), (hidden, intermediate), (intermediate, hidden))}


def hidden_stats_launches(limits: SmLimits, monkey) -> list[Launch]:
    monkey(hidden_stats, "_sm_count", _cuda_sm_count(limits.sm_count))
    launches = []
    for name in MODELS:
        hidden = _model_dims(name)["hidden"]
        for batch in BATCH_SIZES:
            tokens = batch * SEQ_LEN
            # float64 too: the input checks take any float dtype.
            for dtype in FLOAT_DTYPES + (torch.float64,):
                masks = (None, torch.int64) + ((torch.uint8,) if dtype == torch.bfloat16 else ())
                for mask_dtype in masks:
                    block_t, block_h, _, num_warps = hidden_stats._launch_config(tokens, hidden, dtype.itemsize, _CUDA)
                    mask = _tensor(mask_dtype or torch.float32)
                    launches.append(Launch(
                        "_hidden_stats_kernel", hidden_stats._hidden_stats_kernel,
                        (_tensor(dtype), _tensor(dtype), mask, _tensor(torch.float32),
                         tokens, hidden, hidden, hidden, 0 if mask_dtype is None else 1),
                        dict(HAS_MASK=mask_dtype is not None, EPS=hidden_stats.NORM_EPS, BLOCK_T=block_t,
                             BLOCK_H=block_h, num_warps=num_warps, enable_fp_fusion=hidden_stats.ENABLE_FP_FUSION),
                        f"{_short(dtype)}" + (f", {_short(mask_dtype)} mask" if mask_dtype else ""), name))
    return launches


def pooling_launches(limits: SmLimits, monkey) -> list[Launch]:
    launches = []
    for name in MODELS:
        width = _model_dims(name)["hidden"]
        block_t, block_h, num_warps = pooling._launch_config(width, _CUDA)
        for dtype in FLOAT_DTYPES + (torch.float64,):
            # Only the mean reads the mask; last/first pass int32 spans in its place with zero strides.
            masks = (None, torch.int64) + ((torch.uint8,) if dtype == torch.bfloat16 else ())
            for mask_dtype in masks:
                mask = _tensor(torch.int32) if mask_dtype is None else _tensor(mask_dtype)
                mask_strides = (0, 0) if mask_dtype is None else (SEQ_LEN, 1)
                launches.append(Launch(
                    "_masked_pool_kernel", pooling._masked_pool_kernel,
                    (_tensor(dtype), mask, _tensor(torch.int32), _tensor(torch.int32), _tensor(torch.float32),
                     _tensor(torch.float32), width, SEQ_LEN * width, width, *mask_strides),
                    dict(HAS_MASK=mask_dtype is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps,
                         enable_fp_fusion=pooling.ENABLE_FP_FUSION),
                    f"{_short(dtype)}" + (f", {_short(mask_dtype)} mask (mean)" if mask_dtype else ""), name))
    return launches


def grouped_sq_norm_launches(limits: SmLimits, monkey) -> list[Launch]:
    block, blocks_per_chunk, num_warps = grad_norm._grouped_sq_norm_config()
    launches = []
    for dtype in grad_norm.SUPPORTED_DTYPES:
        # 16-byte aligned tensors (fresh allocations), and the element-size alignment of any other.
        for ptr_align in (16, dtype.itemsize):
            launches.append(Launch(
                "_grouped_sq_norm_kernel", grad_norm._grouped_sq_norm_kernel,
                # 7 weight matrices x 30 blocks of SmolLM2-135M: a count the JIT does not specialize.
                (_tensor(torch.int64), _tensor(torch.int64), _tensor(torch.float32), 7 * 30),
                dict(DTYPE=grad_norm._tl_dtype(dtype), PTR_ALIGN=ptr_align, BLOCK=block,
                     BLOCKS_PER_CHUNK=blocks_per_chunk, num_warps=num_warps,
                     enable_fp_fusion=grad_norm.ENABLE_FP_FUSION),
                f"{_short(dtype)}, {ptr_align}-byte aligned", "any"))
    return launches


def _linear_dtype_pairs():
    """(x dtype, dy dtype): every pair of float dtypes; mixed pairs are read as float32."""
    return [(x, dy) for x in FLOAT_DTYPES for dy in FLOAT_DTYPES]


def _linear_launch(kernel_name, kernel, x_dtype, dy_dtype, tokens, d_in, d_out, config, shape) -> Launch:
    """The launch ``grad_norm.launch_linear_kernel`` makes for contiguous ``x [tokens, in]``, ``dy [tokens, out]``."""
    x, dy = torch.empty(0, dtype=x_dtype, device="meta"), torch.empty(0, dtype=dy_dtype, device="meta")
    dot_dtype = grad_norm._dot_dtype(x, dy)
    kwargs = dict(stride_xt=d_in, stride_xi=1, stride_dyt=d_out, stride_dyo=1, DOT_DTYPE=dot_dtype,
                  IEEE=dot_dtype == triton.language.float32, enable_fp_fusion=grad_norm.ENABLE_FP_FUSION, **config)
    return Launch(kernel_name, kernel,
                  (_tensor(x_dtype), _tensor(dy_dtype), _tensor(torch.float32), tokens, d_in, d_out),
                  kwargs, f"x {_short(x_dtype)}, dy {_short(dy_dtype)}, dot {dot_dtype}", shape)


def linear_launches(limits: SmLimits, monkey) -> list[Launch]:
    launches = []
    for x_dtype, dy_dtype in _linear_dtype_pairs():
        tensor_cores = x_dtype == dy_dtype and x_dtype in HALF_DTYPES
        for name in MODELS:
            for batch in BATCH_SIZES:
                tokens = batch * SEQ_LEN
                for d_in, d_out in _model_dims(name)["linears"]:
                    tiled = grad_norm.tiled_config(d_in, d_out, tensor_cores, limits.sm_count)
                    launches.append(_linear_launch("_xt_dy_sq_norm_tiled_kernel", grad_norm._xt_dy_sq_norm_tiled_kernel,
                                                   x_dtype, dy_dtype, tokens, d_in, d_out, tiled, name))
                    gram = grad_norm.gram_config(tokens, tensor_cores, limits.sm_count)
                    launches.append(_linear_launch("_gram_sq_norm_kernel", grad_norm._gram_sq_norm_kernel,
                                                   x_dtype, dy_dtype, tokens, d_in, d_out, gram, name))
    return launches


def slerp_launches(limits: SmLimits, monkey) -> list[Launch]:
    monkey(slerp, "_sm_count", _cuda_sm_count(limits.sm_count))
    launches = []
    pairs = [(a, b) for a in FLOAT_DTYPES for b in FLOAT_DTYPES]
    for name in MODELS:
        dims = _model_dims(name)
        for n in sorted({dims["hidden"] * d_out for _, d_out in dims["linears"]} | {dims["vocab"] * dims["hidden"]}):
            block, _, num_warps = slerp._launch_config(n, _CUDA)
            common = dict(BLOCK=block, num_warps=num_warps, enable_fp_fusion=slerp.ENABLE_FP_FUSION)
            for a_dtype, b_dtype in pairs:
                label = f"a {_short(a_dtype)}, b {_short(b_dtype)}"
                a, b = _tensor(a_dtype), _tensor(b_dtype)
                launches.append(Launch("_slerp_reduce_kernel", slerp._slerp_reduce_kernel,
                                       (a, b, _tensor(torch.float32), n), common, label, name))
                # The result takes a's dtype (out_dtype's default, as mergekit).
                launches.append(Launch("_slerp_write_kernel", slerp._slerp_write_kernel,
                                       (a, b, _tensor(a_dtype), n, 0.25, 0.75), common, label, name))
    return launches


LAUNCH_BUILDERS = (hidden_stats_launches, pooling_launches, grouped_sq_norm_launches, linear_launches, slerp_launches)


def compile_inputs(launch: Launch, target: GPUTarget) -> tuple[ASTSource, dict]:
    """The JIT's own specialization of ``launch`` for ``target``: the source and options it would compile."""
    backend = make_backend(target)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                                     options)
    return ASTSource(launch.kernel, signature, constexprs, attrs), options.__dict__


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def compile_and_measure(source: ASTSource, options: dict, target: GPUTarget) -> dict:
    """Compile for ``target`` (ptxas' verbose report captured) and return registers, spills and shared memory.

    Triton's ``CompiledKernel.n_regs``/``n_spills`` are filled only when a GPU loads the cubin, so
    they come from ptxas' ``-v`` report, which Triton prints when ``TRITON_DUMP_PTXAS_LOG`` is on.
    """
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        compiled = triton.compile(source, target=target, options=options)
    log = report.getvalue()
    regs, spills = _PTXAS_REGS.search(log), _PTXAS_SPILLS.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"no register/spill report in ptxas' output:\n{log}")
    static_smem = _PTXAS_SMEM.search(log)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)),
            "shared_memory": compiled.metadata.shared + (int(static_smem.group(1)) if static_smem else 0)}


def _constexpr_text(value) -> str:
    return str(value).removeprefix("triton.language.")


def build_table() -> dict:
    """Compile every distinct launch for every target; rows, failures and the kernels covered."""
    rows, failures = [], []
    saved = []

    def monkey(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    try:
        for cc, limits in TARGETS.items():
            target = GPUTarget("cuda", cc, 32)
            by_key: dict = {}
            for builder in LAUNCH_BUILDERS:
                for launch in builder(limits, monkey):
                    source, options = compile_inputs(launch, target)
                    constexprs = {launch.kernel.arg_names[path[0]]: _constexpr_text(v)
                                  for path, v in source.constants.items()}
                    key = (launch.kernel_name, str(source.signature), str(sorted(constexprs.items())),
                           str(sorted(source.attrs.items())), options["num_warps"], options["num_stages"],
                           options["enable_fp_fusion"])
                    if key in by_key:
                        if launch.shape not in by_key[key]["shapes"]:
                            by_key[key]["shapes"].append(launch.shape)
                        continue
                    row = {"kernel": launch.kernel_name, "target": f"sm_{cc}", "gpu": limits.gpu,
                           "dtypes": launch.label, "constexprs": constexprs, "num_warps": options["num_warps"],
                           "num_stages": options["num_stages"], "enable_fp_fusion": options["enable_fp_fusion"],
                           "shapes": [launch.shape]}
                    by_key[key] = row
                    try:
                        row.update(compile_and_measure(source, options, target))
                    except Exception as error:  # every failure is reported, then the run fails
                        row["error"] = f"{type(error).__name__}: {error}"[-2000:]
                        failures.append(f"{launch.kernel_name} sm_{cc} {launch.label}: does not compile")
                        rows.append(row)
                        continue
                    row.update(occupancy(row["registers"], row["shared_memory"], row["num_warps"], limits))
                    doc = launch.kernel.fn.__doc__ or ""
                    if row["spill_stores"] or row["spill_loads"]:
                        if SPILL_NOTE not in doc:
                            failures.append(f"{launch.kernel_name} sm_{cc} {launch.label} {constexprs}: spills "
                                            f"{row['spill_stores']} B and its docstring has no '{SPILL_NOTE}' line")
                    if row["blocks_per_sm"] == 0:
                        failures.append(f"{launch.kernel_name} sm_{cc} {launch.label} {constexprs}: cannot be "
                                        f"resident ({row['limited_by']})")
                    rows.append(row)
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
    return {"rows": rows, "failures": failures, "kernels": sorted({row["kernel"] for row in rows})}


def write_markdown(result: dict, path: str) -> None:
    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        f"Triton {result['triton_version']}, PyTorch {result['torch_version']}, {result['date_utc']} on "
        f"{result['device']}; written by "
        "`python benchmarks/aot_table.py`. One row per distinct compile (kernel, target, signature, "
        "constexprs, options); *shapes* lists the model shapes whose launches pick it (seq 1024, batch 1..8). "
        "Occupancy: resident warps per SM over the SM's maximum, from registers and shared memory "
        "(limits in the JSON, with their source).",
        "",
        "| kernel | target | dtypes | constexprs | warps | stages | regs | spills (B) | smem (B) | blocks/SM | "
        "occupancy | limited by | shapes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        constexprs = ", ".join(f"{k}={v}" for k, v in row["constexprs"].items())
        if "error" in row:
            lines.append(f"| {row['kernel']} | {row['target']} | {row['dtypes']} | {constexprs} | {row['num_warps']} "
                         f"| {row['num_stages']} | compile error | | | | | | {', '.join(row['shapes'])} |")
            continue
        lines.append(
            f"| {row['kernel']} | {row['target']} ({row['gpu']}) | {row['dtypes']} | {constexprs} | {row['num_warps']} "
            f"| {row['num_stages']} | {row['registers']} | {row['spill_stores']} | {row['shared_memory']} "
            f"| {row['blocks_per_sm']} | {row['occupancy']:.0%} | {row['limited_by']} | {', '.join(row['shapes'])} |")
    lines += ["", "Failures: " + ("none" if not result["failures"] else "; ".join(result["failures"])), ""]
    write_text(path, "\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--name", default="aot_compile", help="file name of the table, without .json/.md")
    args = parser.parse_args(argv)
    if TRITON_INTERPRET:
        parser.error("it compiles for real GPUs: unset TRITON_INTERPRET (it turns every kernel into Python).")
    started = time.perf_counter()
    # A fresh cache, so that ptxas runs (and reports) for every compile.
    with tempfile.TemporaryDirectory(prefix="aot-triton-cache-") as cache_dir:
        knobs.cache.dir = cache_dir
        knobs.nvidia.dump_ptxas_log = True
        result = build_table()
    result = {**device_info(), "compile_seconds": round(time.perf_counter() - started, 1),
              "limits": {f"sm_{cc}": asdict(limits) for cc, limits in TARGETS.items()},
              "limits_source": SmLimits.__doc__.split("\n\n")[1].strip(), **result}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, args.name)
    write_text(path + ".json", json.dumps(result, indent=1) + "\n")
    write_markdown(result, path + ".md")
    for failure in result["failures"]:
        print(f"aot_table: {failure}", file=sys.stderr)
    print(f"aot_table: {len(result['rows'])} compiles in {result['compile_seconds']} s, "
          f"{len(result['failures'])} failures; wrote {path}.{{json,md}}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""The steps of ``gpu_check.py``: each is ``step_<name>(ctx, **config)`` and records sub-cases in ``ctx``.

They reuse the pytest-benchmark suites' code (the model builder and rows of ``test_bench_memory``, the
implementations of ``test_bench_hidden_stats`` and ``test_bench_grad_norm``) and add what a single
timed pass needs: a timer (:func:`time_call`), the sizes of the goals and the goal table
(:func:`summarize_goals`). On a CPU every step runs at tiny sizes (the unit tests do), through the
PyTorch references or Triton's interpreter; the numbers then mean nothing, the code path is what is tested.

Conventions: ``gbps`` is the *minimum* bytes a kernel must move (each input read once, each output
written once) over its median device time, so implementations that re-read memory are compared fairly;
``fraction_of_copy_bandwidth`` divides it by the device-to-device copy bandwidth measured by the ``env``
step (``bench_utils.copy_bandwidth_gbps``). ``speedup_over`` gives, on a kernel's row, the other
implementations' median time over the kernel's (above 1: the kernel is faster).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

import torch

GIB = 1024**3
# Busy-wait put on the GPU before each timed call, so the host has enqueued the call (and its end event)
# before the GPU reaches the start event: the device time then excludes the host's launch overhead.
SLEEP_CYCLES = 1_000_000  # about 0.5 ms at H200 clocks
L2_FLUSH_BYTES = 256 << 20  # written between timed calls, larger than the H200's 60 MB L2

# Goals, as filed (issue 14) and as the memory suite states them.
GOALS = dict(hidden_stats_fraction=0.80, grouped_speedup=1.5, frozen_vs_matmul=1.2, probe_overhead=0.05,
             planner_error=0.10)
MEMORY_GOALS_GIB = {("llama-3.1-8b", 4): 12.0, ("llama-3.1-8b", 2): 12.0, ("llama-3.2-3b", 4): 8.0}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=None)
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)


def time_call(fn, device: torch.device, target_s: float = 0.2, min_reps: int = 3, max_reps: int = 100,
              warmup: int = 1) -> dict:
    """Median time of ``fn()`` on ``device``, in microseconds.

    After ``warmup`` calls and one call to size the run, ``fn`` is called ``reps`` times (as many as fit in
    ``target_s``, within ``[min_reps, max_reps]``). On CUDA each call is timed with its own pair of CUDA
    events, after a GPU busy-wait (so the host's launch time stays out) and a write of 256 MB (so the L2
    cache starts cold); ``median_us`` is the median of those. ``wall_us`` is the host time per call of
    ``reps`` calls back to back with one synchronisation at the end: launch overheads included.
    On a CPU both are host times.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    begin = time.perf_counter()
    fn()
    _sync(device)
    estimate = time.perf_counter() - begin
    reps = int(min(max_reps, max(min_reps, target_s / max(estimate, 1e-7))))
    if device.type == "cuda":
        flush = _flush_buffer(device)
        sleep = getattr(torch.cuda, "_sleep", None)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in pairs:
            if sleep is not None:
                sleep(SLEEP_CYCLES)
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) * 1e3 for start, end in pairs]
    else:
        times = []
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e6)
    _sync(device)
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    wall = (time.perf_counter() - begin) / reps * 1e6
    return {"median_us": statistics.median(times), "min_us": min(times), "max_us": max(times), "wall_us": wall,
            "reps": reps}


# ---------------------------------------------------------------------------------------------------------
# 1. Environment


def step_env(ctx, copy_bytes: int, copy_repeats: int, matmul_n: int) -> None:
    """Device properties, the copy bandwidth and bf16 matmul rate (the ceilings), a bitsandbytes round trip."""
    from bench_utils import copy_bandwidth_gbps

    device = _device()
    info = ctx.info
    info["device_type"] = device.type
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count, total_memory_gib=props.total_memory / GIB,
                    capability=f"{props.major}.{props.minor}")
        info["nvidia_smi"] = _nvidia_smi()
    ctx.run_case("copy_bandwidth", lambda: {
        "copy_bandwidth_gbps": copy_bandwidth_gbps(device, nbytes=copy_bytes, repeats=copy_repeats),
        "bytes": copy_bytes, "repeats": copy_repeats, "counts": "bytes read + bytes written"})
    ctx.run_case("matmul_bf16", lambda: _matmul_rate(device, matmul_n))
    ctx.run_case("bitsandbytes_nf4", lambda: _bnb_round_trip(device))
    ctx.run_case("triton_backend", _triton_backend)


def _nvidia_smi() -> str | None:
    query = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu,memory.used"
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                              text=True, timeout=20)
        return done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable: {error}"


def _matmul_rate(device: torch.device, n: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    timing = time_call(lambda: a @ b, device, target_s=0.3)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "data": "random normal",
            "tflops": 2 * n**3 / (timing["median_us"] * 1e-6) / 1e12, **timing}


def _bnb_round_trip(device: torch.device) -> dict:
    """bitsandbytes imports (from the carried wheel) and NF4 quantizes and dequantizes on this device."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    w = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4")
    back = bnbf.dequantize_4bit(packed, state).to(w.dtype)
    rel = ((back.float() - w.float()).norm() / w.float().norm()).item()
    return {"bitsandbytes": bnb.__version__, "nf4_round_trip_rel_error": rel, "ok": rel < 0.15,
            "file": os.path.dirname(bnb.__file__)}


def _triton_backend() -> dict:
    from laet_fast.backend import TRITON_INTERPRET, use_triton

    probe = torch.zeros(1, device=_device())
    return {"interpreter": TRITON_INTERPRET, "kernels_use_triton": use_triton(probe)}


# ---------------------------------------------------------------------------------------------------------
# 2. pytest -m gpu


def step_pytest(ctx, args: list[str]) -> None:
    """``python -m pytest <args>`` in the repository, compiled kernels, within the step's time."""
    from gpu_check import REPO

    ctx.run_case("pytest", lambda: run_pytest(args, REPO, timeout=max(ctx.time_left() - 3, 5)), args=args)


def run_pytest(args: list[str], cwd: str, timeout: float) -> dict:
    """Run pytest in a subprocess, killed at ``timeout`` seconds; counts (JUnit XML) and the failing tests."""
    env = dict(os.environ)
    if torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "0"  # what tests/conftest.py decides on CUDA; said here so it is on record
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        log = os.path.join(tmp, "log.txt")
        # A module that fails to import (a package the GPU image lacks) must not stop the other tests.
        cmd = [sys.executable, "-m", "pytest", *args, "-v", "--tb=short", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}"]
        begin = time.time()
        with open(log, "w", encoding="utf-8") as sink:
            # In the step's process group, so the runner's kill of an overrunning step ends pytest too.
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                rc, timed_out = proc.wait(), True
        with open(log, encoding="utf-8", errors="replace") as handle:
            output = handle.read()
        print(output[-6000:], flush=True)
        result = {"command": " ".join(cmd[1:]), "returncode": rc, "timed_out": timed_out,
                  "seconds": round(time.time() - begin, 1), "output_tail": output[-3000:]}
        result.update(parse_junit(junit) if os.path.exists(junit) else _count_verbose(output))
        return result


def parse_junit(path: str) -> dict:
    """Counts (passed, failed, errors, skipped) and the failing tests with their messages, from a JUnit XML."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            bad = case.find(tag)
            if bad is not None:
                failing.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                                "message": (bad.get("message") or "")[:500]})
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failing": failing, "source": "junit"}


def _count_verbose(output: str) -> dict:
    """Counts from ``pytest -v`` lines when no JUnit file was written (the run was killed)."""
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "skipped",
             "XPASS": "passed"}
    counts = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
    failing = []
    for line in output.splitlines():
        if "::" not in line:
            continue
        for word, key in words.items():
            if f" {word}" in line:
                counts[key] += 1
                if key in ("failed", "errors"):
                    failing.append({"test": line.split(" ")[0], "kind": key})
                break
    return {**counts, "failing": failing, "source": "verbose output (no JUnit file: the run was cut short)"}


# ---------------------------------------------------------------------------------------------------------
# 3. Kernels at the goal sizes


def _label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _agreement(got: torch.Tensor, want: torch.Tensor, rtol: float) -> dict:
    """Largest relative difference of ``got`` from the float64 ``want`` (elementwise, floored at 1e-30)."""
    got64, want64 = got.double().reshape(-1), want.double().reshape(-1)
    rel = ((got64 - want64).abs() / want64.abs().clamp_min(1e-30)).max().item()
    return {"max_rel_diff": rel, "rtol": rtol, "ok": bool(rel <= rtol)}


def _norm_agreement(got: torch.Tensor, want: torch.Tensor, rtol: float) -> dict:
    """``||got - want|| / ||want||`` (for whole tensors such as a SLERP result or pooled vectors)."""
    rel = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    return {"rel_norm_diff": rel, "rtol": rtol, "ok": bool(rel <= rtol)}


def _copy_bandwidth(ctx, device: torch.device) -> tuple[float | None, str]:
    """The copy bandwidth from env.json when the env step measured it, else measured now (GPU only)."""
    from gpu_check import read_json

    env = read_json(os.path.join(ctx.out_dir, "env.json")) or {}
    for case in env.get("cases", []):
        if case.get("case") == "copy_bandwidth" and case.get("copy_bandwidth_gbps"):
            return case["copy_bandwidth_gbps"], "env.json"
    if device.type != "cuda":
        return None, "not measured on CPU"
    from bench_utils import copy_bandwidth_gbps

    return copy_bandwidth_gbps(device), "measured in this step"


class _Inputs:
    """Inputs made on first use and kept for later sub-cases (the compile references run last)."""

    def __init__(self):
        self._made = {}

    def get(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


def step_kernels(ctx, hidden_stats: list, grad_norm_shape, frozen_linear: list, slerp_shape: list,
                 pooling_shape: list, dtype: str, compile_refs: bool, target_s: float = 0.2) -> None:
    """Every kernel against its references: the kernels and eager references first, compile references last."""
    device = _device()
    dt = getattr(torch, dtype)
    copy_gbps, source = _copy_bandwidth(ctx, device)
    ctx.info.update(copy_bandwidth_gbps=copy_gbps, copy_bandwidth_source=source, device_type=device.type,
                    gbps="minimum bytes (each input read once, each output written once) / median device time")
    ctx.derive = derive_kernel_ratios
    # what the CPU's ahead-of-time compile found for this GPU's architecture, beside the bandwidth measured here
    major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    ctx.info["compile_table"] = compile_table_summary(f"sm_{major}{minor}")
    inputs = _Inputs()
    cases = []  # (name, labels, thunk), in the order they run
    for tokens, hidden, case_dtype in hidden_stats:
        cases += _hidden_stats_cases(inputs, device, tokens, hidden, getattr(torch, case_dtype), copy_gbps, target_s)
    cases += _grouped_norm_cases(inputs, device, grad_norm_shape, dt, copy_gbps, target_s)
    for tokens, d_in, d_out in frozen_linear:
        cases += _frozen_cases(inputs, device, tokens, d_in, d_out, dt, copy_gbps, target_s)
    cases += _optional_cases(ctx, inputs, device, "slerp", slerp_shape, dt, copy_gbps, target_s)
    cases += _optional_cases(ctx, inputs, device, "pooling", pooling_shape, dt, copy_gbps, target_s)
    first = [c for c in cases if c[1]["kind"] != "compile"]
    # torch.compile takes seconds per graph and the grouped one (hundreds of tensors) the longest: last of all,
    # so that a step cut short by its budget loses compile ratios only.
    last = sorted((c for c in cases if c[1]["kind"] == "compile"), key=lambda c: c[1]["kernel"] == "grouped_norms")
    if not compile_refs:
        last = []
        ctx.info["compile_refs"] = "off"
    for name, labels, thunk in first + last:
        ctx.run_case(name, thunk, **labels)


def compile_table_summary(target: str) -> dict:
    """Per kernel, the registers, spills and occupancy ``benchmarks/aot_table.py`` found compiling it for ``target``
    (e.g. ``sm_90``) on a CPU, over the launch configurations it compiled; ``{"missing": ...}`` without its
    results file or that target."""
    from bench_utils import read_result

    table = read_result("aot_compile")
    if table is None:
        return {"missing": "benchmarks/results/aot_compile.json (run benchmarks/aot_table.py)"}
    rows = [row for row in table.get("rows", []) if row.get("target") == target]
    if not rows:
        return {"missing": f"no compile of {target} in aot_compile.json"}
    summary = {}
    for row in rows:
        entry = summary.setdefault(row["kernel"], {"configurations": 0, "registers": [], "occupancy": [],
                                                   "spill_bytes": 0})
        entry["configurations"] += 1
        entry["registers"].append(row["registers"])
        entry["occupancy"].append(row["occupancy"])
        entry["spill_bytes"] = max(entry["spill_bytes"], row["spill_stores"] + row["spill_loads"])
    for entry in summary.values():
        entry["registers"] = [min(entry["registers"]), max(entry["registers"])]
        entry["occupancy"] = [min(entry["occupancy"]), max(entry["occupancy"])]
    return {"target": target, "source": f"aot_compile.json (Triton {table.get('triton_version')})", "kernels": summary}


def _timed_row(fn, device, min_bytes: int, copy_gbps: float | None, target_s: float, **extra) -> dict:
    timing = time_call(fn, device, target_s=target_s)
    gbps = min_bytes / (timing["median_us"] * 1e-6) / 1e9
    row = {**timing, "min_bytes": min_bytes, "gbps": gbps, **extra}
    if copy_gbps:
        row["fraction_of_copy_bandwidth"] = gbps / copy_gbps
    return row


def _hidden_stats_cases(inputs, device, tokens, hidden, dtype, copy_gbps, target_s):
    from cases import hidden_stats_implementation

    from laet_fast.kernels.hidden_stats import hidden_stats_reference, new_stats_buffer

    size = f"{tokens}x{hidden} {_label(dtype)}"

    def make():
        gen = torch.Generator(device=device).manual_seed(0)
        h_in = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
        h_out = (h_in.float() + 0.3 * torch.randn(tokens, hidden, generator=gen, device=device)).to(dtype)
        return h_in, h_out, hidden_stats_reference(h_in, h_out, None)

    def case(impl):
        def run():
            h_in, h_out, want = inputs.get(("hidden", tokens, hidden, dtype), make)
            fn = hidden_stats_implementation(impl)
            got = new_stats_buffer(1, device)[0]
            fn(h_in, h_out, None, got)  # also the warm-up (JIT, torch.compile)
            acc = new_stats_buffer(1, device)[0]
            return _timed_row(lambda: fn(h_in, h_out, None, acc), device, 2 * tokens * hidden * h_in.element_size(),
                              copy_gbps, target_s, check=_agreement(got, want, 2e-3))
        return run

    kinds = {"triton": "kernel", "torch_eager": "eager", "torch_compile": "compile"}
    return [(f"hidden_stats {size} {impl}", dict(kernel="hidden_stats", size=size, impl=impl, kind=kind), case(impl))
            for impl, kind in kinds.items()]


def block_dims(shape) -> dict:
    """Dimensions for ``cases.llama_block_shapes`` from a built-in shape name or a dict of them."""
    if isinstance(shape, dict):
        return dict(shape)
    from laet_fast.memory import MODEL_SHAPES

    s = MODEL_SHAPES[shape]
    return dict(blocks=s["num_hidden_layers"], hidden=s["hidden_size"], intermediate=s["intermediate_size"],
                heads=s["num_attention_heads"], kv_heads=s["num_key_value_heads"], head_dim=s["head_dim"])


@contextlib.contextmanager
def _torch_backend():
    """``LAET_FAST_BACKEND=torch`` for the calls inside (the kernels' PyTorch path)."""
    before = os.environ.get("LAET_FAST_BACKEND")
    os.environ["LAET_FAST_BACKEND"] = "torch"
    try:
        yield
    finally:
        if before is None:
            del os.environ["LAET_FAST_BACKEND"]
        else:
            os.environ["LAET_FAST_BACKEND"] = before


def _grouped_norm_cases(inputs, device, shape, dtype, copy_gbps, target_s):
    from cases import foreach_grouped_norms, llama_block_shapes, per_tensor_item_norms

    from laet_fast.kernels.grad_norm import grouped_sq_norms, grouped_sq_norms_reference

    dims = block_dims(shape)
    size = f"{shape if isinstance(shape, str) else 'custom'} {dims['blocks']} blocks {_label(dtype)}"

    def make():
        gen = torch.Generator(device=device).manual_seed(0)
        tensors, groups = [], []
        for block in range(dims["blocks"]):
            for param_shape in llama_block_shapes(**dims):
                tensors.append(torch.empty(param_shape, dtype=dtype, device=device).normal_(0, 1e-3, generator=gen))
                groups.append(block)
        want = grouped_sq_norms_reference(tensors, groups, dims["blocks"])
        return tensors, groups, torch.tensor(groups, device=device), want

    def impl_fn(impl, tensors, groups, index, out):
        if impl == "triton":
            return lambda: grouped_sq_norms(tensors, groups, out)
        if impl == "torch_path":
            def run():
                with _torch_backend():
                    grouped_sq_norms(tensors, groups, out)
            return run
        if impl == "foreach_grouped":
            return lambda: foreach_grouped_norms(tensors, index, out)
        if impl == "torch_compile":
            compiled = torch.compile(foreach_grouped_norms, dynamic=False)
            return lambda: compiled(tensors, index, out)

        def per_tensor():
            values = [0.0] * dims["blocks"]
            per_tensor_item_norms(tensors, groups, values)
            out.add_(torch.tensor(values, device=device))
        return per_tensor

    def case(impl):
        def run():
            tensors, groups, index, want = inputs.get(("grouped", str(shape), dtype), make)
            check = torch.zeros(dims["blocks"], device=device)
            impl_fn(impl, tensors, groups, index, check)()
            # _foreach_norm and .norm() return bf16 norms for bf16 tensors: their rows round to bf16.
            rtol = 1e-4 if impl in ("triton", "torch_path") else 2e-2
            out = torch.zeros(dims["blocks"], device=device)
            fn = impl_fn(impl, tensors, groups, index, out)
            min_bytes = sum(t.numel() * t.element_size() for t in tensors)
            return _timed_row(fn, device, min_bytes, copy_gbps, target_s, tensors=len(tensors),
                              check=_agreement(check, want, rtol))
        return run

    kinds = {"triton": "kernel", "foreach_grouped": "eager", "per_tensor_item": "eager", "torch_path": "eager",
             "torch_compile": "compile"}
    return [(f"grouped_norms {size} {impl}", dict(kernel="grouped_norms", size=size, impl=impl, kind=kind),
             case(impl)) for impl, kind in kinds.items()]


def _frozen_cases(inputs, device, tokens, d_in, d_out, dtype, copy_gbps, target_s):
    from cases import frozen_linear_norm_fn

    from laet_fast.kernels.grad_norm import linear_grad_sq_norm_reference

    size = f"{tokens}x{d_in}x{d_out} {_label(dtype)}"

    def make():
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(tokens, d_in, generator=gen, device=device).to(dtype)
        dy = (torch.randn(tokens, d_out, generator=gen, device=device) * 1e-2).to(dtype)
        return x, dy, linear_grad_sq_norm_reference(x, dy)

    def materialise(x, dy):
        return (dy.T @ x).float().square().sum()

    def case(impl):
        def run():
            x, dy, want = inputs.get(("frozen", tokens, d_in, d_out, dtype), make)
            out = torch.zeros(1, device=device)
            if impl == "torch_compile":
                compiled = torch.compile(materialise, dynamic=False)
                fn = lambda: out.add_(compiled(x, dy))  # noqa: E731
            else:
                fn = frozen_linear_norm_fn(impl, x, dy, out)
            fn()  # compiles / autotunes outside the timing
            extra = {}
            if impl != "matmul_only":
                out.zero_()
                fn()
                # bf16 dW in "materialise" rounds each entry; the kernels accumulate in float32.
                extra["check"] = _agreement(out, want, 1e-2 if impl in ("materialise", "torch_compile") else 1e-3)
            extra["peak_extra_bytes"] = _peak_extra(fn, device)
            extra["weight_bytes"] = d_in * d_out * x.element_size()
            row = _timed_row(fn, device, tokens * (d_in + d_out) * x.element_size(), copy_gbps, target_s, **extra)
            row["tflops_as_matmul"] = 2 * tokens * d_in * d_out / (row["median_us"] * 1e-6) / 1e12
            return row
        return run

    kinds = {"tiled": "kernel", "gram": "kernel", "materialise": "eager", "matmul_only": "baseline",
             "torch_compile": "compile"}
    return [(f"frozen_linear {size} {impl}", dict(kernel="frozen_linear", size=size, impl=impl, kind=kind),
             case(impl)) for impl, kind in kinds.items()]


def _peak_extra(fn, device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _optional_cases(ctx, inputs, device, kernel, shape, dtype, copy_gbps, target_s):
    """SLERP and pooling, which other work adds: their cases when the module exists, else one "absent" row."""
    module = f"laet_fast.kernels.{kernel}"
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        ctx.cases.append({"case": f"{kernel} absent", "kernel": kernel, "absent": True,
                          "note": f"{module} is not in this checkout"})
        return []
    if kernel == "slerp":
        return _slerp_cases(inputs, device, shape, dtype, copy_gbps, target_s)
    return _pooling_cases(inputs, device, shape, dtype, copy_gbps, target_s)


def _slerp_cases(inputs, device, shape, dtype, copy_gbps, target_s):
    from laet_fast.kernels.slerp import slerp, slerp_reference

    size = f"{'x'.join(map(str, shape))} {_label(dtype)}"
    weight = 0.3

    def make():
        gen = torch.Generator(device=device).manual_seed(2)
        a = torch.randn(*shape, generator=gen, device=device).to(dtype)
        b = torch.randn(*shape, generator=gen, device=device).to(dtype)
        return a, b, slerp_reference(a, b, weight, compute_dtype=torch.float64)

    eager = functools.partial(slerp_reference, compute_dtype=torch.float32)
    fns = {"triton": slerp, "torch_eager": eager, "torch_compile": None}

    def case(impl):
        def run():
            a, b, want = inputs.get(("slerp", tuple(shape), dtype), make)
            fn = fns[impl] or torch.compile(eager, dynamic=False)
            got = fn(a, b, weight)
            return _timed_row(lambda: fn(a, b, weight), device, 3 * a.numel() * a.element_size(), copy_gbps,
                              target_s, check=_norm_agreement(got, want, 1e-2))
        return run

    kinds = {"triton": "kernel", "torch_eager": "eager", "torch_compile": "compile"}
    return [(f"slerp {size} {impl}", dict(kernel="slerp", size=size, impl=impl, kind=kind), case(impl))
            for impl, kind in kinds.items()]


def _pooling_cases(inputs, device, shape, dtype, copy_gbps, target_s):
    from laet_fast.kernels.pooling import masked_pool, masked_pool_reference

    batch, seq, hidden = shape
    size = f"{batch}x{seq}x{hidden} {_label(dtype)} mean"

    def make():
        gen = torch.Generator(device=device).manual_seed(3)
        states = torch.randn(batch, seq, hidden, generator=gen, device=device).to(dtype)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        return states, mask, masked_pool_reference(states, mask, "mean", compute_dtype=torch.float64)

    eager = functools.partial(masked_pool_reference, compute_dtype=torch.float32)
    fns = {"triton": masked_pool, "torch_eager": eager, "torch_compile": None}

    def case(impl):
        def run():
            states, mask, want = inputs.get(("pool", tuple(shape), dtype), make)
            fn = fns[impl] or torch.compile(eager, dynamic=False)
            got = fn(states, mask, "mean")
            min_bytes = states.numel() * states.element_size() + mask.numel() * mask.element_size() + batch * hidden * 4
            return _timed_row(lambda: fn(states, mask, "mean"), device, min_bytes, copy_gbps, target_s,
                              check=_norm_agreement(got, want, 1e-3))
        return run

    kinds = {"triton": "kernel", "torch_eager": "eager", "torch_compile": "compile"}
    return [(f"pooling {size} {impl}", dict(kernel="pooling", size=size, impl=impl, kind=kind), case(impl))
            for impl, kind in kinds.items()]


def derive_kernel_ratios(cases: list[dict]) -> dict:
    """On each kernel row: ``speedup_over`` (other implementations' median time / the kernel's) per size;
    on frozen-linear kernel rows also ``time_vs_matmul_only`` (goal <= 1.2)."""
    groups: dict[tuple, list[dict]] = {}
    for row in cases:
        if "median_us" in row:
            groups.setdefault((row.get("kernel"), row.get("size")), []).append(row)
    for rows in groups.values():
        for row in rows:
            if row.get("kind") != "kernel":
                continue
            row["speedup_over"] = {other["impl"]: other["median_us"] / row["median_us"]
                                   for other in rows if other is not row}
            matmul = row["speedup_over"].get("matmul_only")
            if matmul:
                row["time_vs_matmul_only"] = 1 / matmul
    return {}


# ---------------------------------------------------------------------------------------------------------
# 4. Memory


def model_config(shape):
    """A LlamaConfig from a built-in shape name (``laet_fast.memory.MODEL_SHAPES``) or a dict of its fields."""
    from laet_fast.memory import shape_config

    if isinstance(shape, str):
        return shape_config(shape), shape
    from transformers import LlamaConfig

    config = LlamaConfig(**shape)
    config.name_or_path = "custom"
    return config, "custom"


def _laet_kind(quantize: str | None, optimizer: str, batch: int) -> str:
    """The ``test_bench_memory`` row this configuration is (its builder fixes AdamW8bit and its BATCH)."""
    import cases as suite

    if optimizer != "adamw8bit" or batch != suite.BATCH or quantize not in ("nf4", None):
        raise ValueError(f"the memory rows are laet_fast with NF4 or bf16 frozen blocks, AdamW8bit and batch "
                         f"{suite.BATCH} (cases.row_setup); got quantize={quantize!r}, "
                         f"optimizer={optimizer!r}, batch={batch}")
    return "laet_nf4" if quantize == "nf4" else "laet_bf16"


def step_memory(ctx, shapes: list, ks: list, seq: int, batch: int, quantize: str | None, optimizer: str,
                warmup: int, steps: int) -> None:
    """Peak allocated memory against the plan for every shape and k, in the order given."""
    kind = _laet_kind(quantize, optimizer, batch)
    for shape in shapes:
        config, name = model_config(shape)
        for k in ks:
            ctx.run_case(f"memory {name} k={k}", functools.partial(measure_memory, config, k, seq, kind, warmup, steps),
                         shape=name, k=k, seq=seq, batch=batch, quantize=quantize, optimizer=optimizer,
                         cpu_figure=cpu_figure(shape, k, seq, optimizer))


def cpu_figure(shape: str, k: int, seq: int, optimizer: str) -> dict | None:
    """What ``benchmarks/memory_cpu.py`` measured on a CPU for this shape and k (lm task, the model's own loss),
    from its committed results, to set beside the GPU's peak: None when it has no such run."""
    from bench_utils import read_result

    name = f"memory_cpu_{shape}"
    for run in (read_result(name) or {}).get("runs", []):
        if (run.get("task"), run.get("k"), run.get("seq_len"), run.get("optimizer"), run.get("loss_chunk")) == \
                ("lm", k, seq, optimizer, 0):
            keep = ("measured_forward_backward_peak_gib", "measured_optimizer_step_peak_gib", "measured_peak_gib",
                    "planned_peak_allocated_gib")
            return {name: run[name] for name in keep if name in run} | {"source": f"{name}.json"}
    return None


def measure_memory(config, k: int, seq: int, kind: str, warmup: int, steps: int) -> dict:
    """One laet_fast row: the model built on meta and materialised straight into NF4, its plan, its peak.

    CUDA: the steady-state ``max_memory_allocated`` above what was allocated before the model was built,
    against ``plan.peak_allocated`` (``cases.steady_peak``). CPU: the live-allocation peak of a
    forward+backward above its start against the plan's loss/backward phases (what the CPU can check).
    """
    import cases as suite

    from laet_fast.measure import measure_cpu_peak

    device = _device()
    release()
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    built = time.perf_counter()
    model, optimizer, plan = suite.row_setup(kind, config, k, device.type, seq=seq)
    build_s = time.perf_counter() - built
    ids = torch.randint(0, config.vocab_size, (suite.BATCH, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    record = {"build_s": build_s, "planned_peak_gib": plan.peak_allocated / GIB, "planned_total_gib": plan.total / GIB,
              "plan": plan.to_dict()}
    try:
        if device.type == "cuda":
            peak, seconds = suite.steady_peak(model, optimizer, ids, baseline, warmup=warmup, steps=steps)
            record.update(peak_gib=peak / GIB, step_s=seconds, planner_error=(plan.peak_allocated - peak) / peak,
                          measured="torch.cuda.max_memory_allocated, steady state, above the pre-build level")
        else:
            suite.train_step(model, optimizer, ids)

            # The model is an argument, not a closure over the name that `finally` deletes.
            def forward_backward(model):
                out = model(input_ids=ids, labels=ids, use_cache=False)  # kept through backward, as planned
                out.loss.backward()

            peak = measure_cpu_peak(functools.partial(forward_backward, model))
            planned = max(plan.phases["loss"], plan.phases["backward"])
            record.update(cpu_fwd_bwd_peak_bytes=peak, planned_fwd_bwd_bytes=planned,
                          planner_error=(planned - peak) / peak,
                          measured="CPU allocator trace of forward+backward against the plan's loss/backward phases")
    finally:
        del model, optimizer
        release()
    return record


# ---------------------------------------------------------------------------------------------------------
# 5. Step time on the 8B shape


LAET_MODES = ("laet_nf4", "probe_forward", "probe_grad_norms", "off_full")


@contextlib.contextmanager
def _mode(model, mode: str):
    """The probe or backward setting of one step-time mode (see ``step_step_time``)."""
    from laet_fast.apply import suspend_backward_cut
    from laet_fast.probe import LayerProbe

    if mode == "laet_nf4":
        yield None
    elif mode == "off_full":
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        try:
            with suspend_backward_cut(model):
                yield None
        finally:
            hook.remove()
    else:
        with LayerProbe(model, grad_norms=mode == "probe_grad_norms") as probe:
            yield probe


def time_steps(model, optimizer, ids, warmup: int, steps: int) -> dict:
    """Median wall time of full training steps (forward, backward, optimizer step; synchronised each)."""
    import cases as suite

    device = ids.device
    for _ in range(warmup):
        suite.train_step(model, optimizer, ids)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        suite.train_step(model, optimizer, ids)
        _sync(device)
        times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    row = {"step_ms": median * 1e3, "step_ms_all": [t * 1e3 for t in times], "tokens_per_s": ids.numel() / median,
           "tokens_per_step": ids.numel()}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return row


def step_step_time(ctx, shape, seq: int, batch: int, k: int, lora_r: int, warmup: int, steps: int,
                   modes: list[str]) -> None:
    """Training-step time: laet_fast (k blocks, NF4), with the probe's forward statistics and gradient norms,
    with the full backward and no scoring, then QLoRA and bf16 LoRA (r = ``lora_r``) on the same shape."""
    import cases as suite

    unknown = sorted(set(modes) - set(LAET_MODES) - {"qlora_r16", "lora_r16"})
    if unknown:
        raise ValueError(f"unknown step-time modes {unknown}; choose from {[*LAET_MODES, 'qlora_r16', 'lora_r16']}")
    if batch != suite.BATCH or lora_r != 16:
        raise ValueError(f"the rows are cases.row_setup's: batch {suite.BATCH}, LoRA r=16; "
                         f"got batch={batch}, lora_r={lora_r}")
    device = _device()
    config, name = model_config(shape)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    ctx.derive = derive_overheads
    ctx.info.update(shape=name, device_type=device.type)
    laet = [m for m in modes if m in LAET_MODES]
    if laet:
        model, optimizer, _ = suite.row_setup("laet_nf4", config, k, device.type, seq=seq)
        try:
            for mode in laet:
                ctx.run_case(f"step {mode}", functools.partial(_time_mode, model, optimizer, ids, mode, warmup, steps),
                             mode=mode, k=k, seq=seq, batch=batch)
        finally:
            del model, optimizer
            release()
    for mode in (m for m in modes if m in ("qlora_r16", "lora_r16")):
        ctx.run_case(f"step {mode}", functools.partial(_time_lora, config, mode, ids, warmup, steps),
                     mode=mode, r=lora_r, seq=seq, batch=batch)


def _time_mode(model, optimizer, ids, mode, warmup, steps) -> dict:
    with _mode(model, mode) as probe:
        row = time_steps(model, optimizer, ids, warmup, steps)
    if probe is not None:
        scores = probe.scores()
        metric = "grad_norm" if mode == "probe_grad_norms" else "block_influence"
        values = list(scores[metric])
        row["scored_blocks"] = len(values)
        row["scores_finite"] = bool(all(math.isfinite(v) for v in values))
    return row


def _time_lora(config, mode, ids, warmup, steps) -> dict:
    """QLoRA / bf16 LoRA, every block adapted (``cases.row_setup``); bf16 only if it fits."""
    import cases as suite

    from laet_fast.memory import plan_memory

    device = ids.device
    if mode == "lora_r16" and device.type == "cuda":
        weights = plan_memory(config, 0, ids.shape[1], ids.shape[0]).frozen_weights
        free, _ = torch.cuda.mem_get_info(device)
        need = int(1.5 * weights) + 8 * GIB  # bf16 base, LoRA activations through every block, slack
        if free < need:
            return {"skipped": f"does not fit: ~{need / GIB:.0f} GiB needed, {free / GIB:.0f} GiB free"}
    release()
    model, optimizer, _ = suite.row_setup(mode, config, 0, device.type, seq=ids.shape[1])
    try:
        return time_steps(model, optimizer, ids, warmup, steps)
    finally:
        del model, optimizer
        release()


def derive_overheads(cases: list[dict]) -> dict:
    """Probe overheads per step: forward statistics and gradient norms against the plain laet_fast step,
    gradient norms against the same full backward without scoring, and the baselines' speed ratios."""
    ms = {c["mode"]: c["step_ms"] for c in cases if "step_ms" in c}
    out = {}
    if "laet_nf4" in ms:
        base = ms["laet_nf4"]
        for mode in ("probe_forward", "probe_grad_norms", "off_full"):
            if mode in ms:
                out[f"{mode}_overhead_vs_laet_nf4"] = ms[mode] / base - 1
        for mode in ("qlora_r16", "lora_r16"):
            if mode in ms:
                out[f"{mode}_time_over_laet_nf4"] = ms[mode] / base
    if "probe_grad_norms" in ms and "off_full" in ms:
        out["probe_grad_norms_overhead_vs_off_full"] = ms["probe_grad_norms"] / ms["off_full"] - 1
    return {"overheads": out}


# ---------------------------------------------------------------------------------------------------------
# Goals


def _goal(goal: str, measured, limit, higher_is_better: bool, source: str) -> dict:
    met = None
    if isinstance(measured, (int, float)) and math.isfinite(measured):
        met = bool(measured >= limit) if higher_is_better else bool(measured < limit)
    return {"goal": goal, "measured": measured, "limit": limit, "met": met, "source": source}


def summarize_goals(payloads: dict[str, dict]) -> list[dict]:
    """Every goal of the project with its measured figure (None where the step did not measure it)."""
    goals = []
    cases = lambda step: (payloads.get(step) or {}).get("cases", [])  # noqa: E731

    tests = next((c for c in cases("pytest_gpu") if "passed" in c), None)
    failed = None if tests is None else tests["failed"] + tests["errors"]
    goals.append(_goal("pytest -m gpu: failures + errors", failed, 1, False, "pytest_gpu.json"))

    kernel_rows = [c for c in cases("kernels") if c.get("kind") == "kernel" and "median_us" in c]
    for row in (r for r in kernel_rows if r["kernel"] == "hidden_stats"):
        goals.append(_goal(f"hidden stats {row['size']}: fraction of copy bandwidth",
                           row.get("fraction_of_copy_bandwidth"), GOALS["hidden_stats_fraction"], True, "kernels.json"))
    for row in (r for r in kernel_rows if r["kernel"] == "grouped_norms"):
        goals.append(_goal(f"grouped norms {row['size']}: speedup over _foreach_norm",
                           row.get("speedup_over", {}).get("foreach_grouped"), GOALS["grouped_speedup"], True,
                           "kernels.json"))
    sizes = sorted({r["size"] for r in kernel_rows if r["kernel"] == "frozen_linear"})
    for size in sizes:
        ratios = [r["time_vs_matmul_only"] for r in kernel_rows
                  if r["kernel"] == "frozen_linear" and r["size"] == size and "time_vs_matmul_only" in r]
        goals.append(_goal(f"frozen-linear norm {size}: best kernel time / dW matmul",
                           min(ratios) if ratios else None, GOALS["frozen_vs_matmul"], False, "kernels.json"))

    overheads = (payloads.get("step_time") or {}).get("overheads", {})
    goals.append(_goal("probe forward statistics: step overhead", overheads.get("probe_forward_overhead_vs_laet_nf4"),
                       GOALS["probe_overhead"], False, "step_time.json"))
    goals.append(_goal("probe gradient norms: overhead vs the same full backward",
                       overheads.get("probe_grad_norms_overhead_vs_off_full"), GOALS["probe_overhead"], False,
                       "step_time.json"))

    memory = [c for c in cases("memory") if "planner_error" in c]
    errors = [abs(c["planner_error"]) for c in memory]
    goals.append(_goal("planner: largest |plan - max_memory_allocated| / measured", max(errors) if errors else None,
                       GOALS["planner_error"], False, "memory.json"))
    for (shape, k), limit in MEMORY_GOALS_GIB.items():
        row = next((c for c in memory if c.get("shape") == shape and c.get("k") == k and "peak_gib" in c), None)
        goals.append(_goal(f"{shape} k={k} NF4 AdamW8bit seq 1024: peak GiB", row and row["peak_gib"], limit, False,
                           "memory.json"))
    return goals


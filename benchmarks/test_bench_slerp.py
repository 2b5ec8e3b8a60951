"""SLERP: the two-pass Triton kernel vs the PyTorch composite (eager and torch.compile), in GB/s.

``bench_slerp(device, numel, dtype)`` is a plain function (also called by other GPU checks). Every
implementation is charged the same minimum traffic, ``3 * numel * itemsize`` bytes (read both
inputs once, write the result once), so the GB/s compare directly; the kernel reads its inputs
twice (5 * numel * itemsize moved), so its ceiling is 3/5 of the copy bandwidth, which is measured
alongside. On a GPU the suite writes ``benchmarks/results/slerp.json``; on a CPU only a tiny eager
run checks that the function works.

    python -m pytest benchmarks/test_bench_slerp.py -q
"""
from __future__ import annotations

import functools
import time

import pytest
import torch

from bench_utils import bandwidth_gbps, copy_bandwidth_gbps, write_result
from laet_fast.kernels.slerp import slerp, slerp_reference

ON_CUDA = torch.cuda.is_available()
IMPLS = ("triton", "torch_eager", "torch_compile")
T = 0.37


def _implementation(impl: str):
    if impl == "triton":
        return slerp
    reference = functools.partial(slerp_reference, compute_dtype=torch.float32)
    if impl == "torch_eager":
        return reference
    return torch.compile(reference, dynamic=False)


def _seconds_per_call(fn, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats


def bench_slerp(device, numel: int, dtype: torch.dtype, impls=IMPLS, repeats: int = 20,
                copy_gbps: float | None = None) -> dict:
    """Time ``slerp(a, b, 0.37)`` of two ``[numel]`` tensors per implementation.

    Args:
        device: "cuda", "cuda:N" or "cpu".
        numel: elements per tensor; dtype: float32, bfloat16 or float16.
        impls: a subset of ("triton", "torch_eager", "torch_compile").
        copy_gbps: the device's copy bandwidth (read + write, GB/s); measured here (1 GiB copies) when None.

    Returns a dict: ``numel``, ``dtype``, ``bytes_min`` (3 * numel * itemsize),
    ``copy_bandwidth_gbps`` and per implementation ``{impl: {"us_per_call" (best of three means), "gbps",
    "fraction_of_copy_bandwidth", "max_abs_error"}}``, where the error is against the float64
    reference. Each implementation is checked first (a wrong kernel is not worth timing) and
    warmed up (Triton JIT, torch.compile).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(numel, generator=gen, device=device).to(dtype)
    b = (0.8 * a.float() + 0.6 * torch.randn(numel, generator=gen, device=device)).to(dtype)
    want = slerp_reference(a, b, T, out_dtype=torch.float64)
    if copy_gbps is None:
        # 1 GiB, far past the last-level cache: the bandwidth of memory, not of L2.
        copy_gbps = copy_bandwidth_gbps(device) if device.type == "cuda" else copy_bandwidth_gbps(device, 1 << 24, 2)
    bytes_min = 3 * numel * a.element_size()
    result = {"numel": numel, "dtype": str(dtype).replace("torch.", ""), "bytes_min": bytes_min,
              "copy_bandwidth_gbps": copy_gbps, "t": T}
    for impl in impls:
        fn = _implementation(impl)
        got = fn(a, b, T)
        error = float((got.double() - want).abs().max())
        tolerance = 4 * torch.finfo(dtype).eps * float(want.abs().max())
        assert error <= tolerance, f"{impl}: max error {error:.3g} > {tolerance:.3g}"
        seconds = min(_seconds_per_call(lambda: fn(a, b, T), device, repeats) for _ in range(3))
        gbps = bandwidth_gbps(bytes_min, seconds)
        result[impl] = {"us_per_call": seconds * 1e6, "gbps": gbps, "fraction_of_copy_bandwidth": gbps / copy_gbps,
                        "max_abs_error": error}
    return result


# A 576x1536 SmolLM2 MLP matrix, a 4096x4096 attention matrix, a 4096x14336 Llama-8B MLP matrix.
GPU_CASES = [(576 * 1536, torch.bfloat16), (4096 * 4096, torch.bfloat16), (4096 * 14336, torch.bfloat16),
             (4096 * 14336, torch.float32)]


@pytest.fixture(scope="module")
def gpu_rows():
    rows = []
    yield rows
    if rows:
        write_result("slerp", {"bytes_min": "3 * numel * itemsize (read a and b once, write once)", "cases": rows})


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA (the interpreter on CPU is a correctness tool)")
@pytest.mark.parametrize("numel,dtype", GPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_slerp_throughput_gpu(gpu_rows, numel, dtype):
    gpu_rows.append(bench_slerp("cuda", numel, dtype))


def test_bench_slerp_runs_on_cpu():
    # The Triton case on CPU would time the interpreter, and torch.compile spends a minute building.
    row = bench_slerp("cpu", 4099, torch.float32, impls=("torch_eager",), repeats=2)
    assert row["torch_eager"]["gbps"] > 0 and row["bytes_min"] == 3 * 4099 * 4

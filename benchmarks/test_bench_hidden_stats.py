"""Fused hidden-state statistics: Triton kernel vs the PyTorch reference (eager and torch.compile).

On a GPU every case reports the achieved read bandwidth (bytes read = 2 * tokens * hidden *
itemsize, one pass over h_in and h_out) and its fraction of the measured copy bandwidth in
``benchmark.extra_info``, and the suite writes ``benchmarks/results/hidden_stats.json``.
On a CPU only the eager reference runs, at a tiny size, so that the suite keeps working.

    python -m pytest benchmarks/test_bench_hidden_stats.py -q
"""
import pytest
import torch

from bench_utils import bandwidth_gbps, copy_bandwidth_gbps, write_result
from cases import hidden_stats_implementation
from laet_fast.kernels.hidden_stats import (
    accumulate_hidden_stats_reference,
    new_stats_buffer,
)

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# (tokens, hidden, dtype): SmolLM2's hidden 576, a 1.5B-class 2048, and the 16k x 4096 target.
GPU_CASES = [
    (2048, 576, torch.bfloat16),
    (4096, 2048, torch.bfloat16),
    (16384, 4096, torch.bfloat16),
    (16384, 4096, torch.float32),
]
CPU_CASES = [(256, 576, torch.float32)]
CASES = GPU_CASES if ON_CUDA else CPU_CASES
IMPLS = ["triton", "torch_eager", "torch_compile"]
# Launches per timed round on the GPU: one launch of the largest case is ~0.1 ms, so a round of
# several launches and one synchronize keeps the sync out of the per-launch time.
CALLS_PER_ROUND = 10 if ON_CUDA else 1
ROUNDS = 20 if ON_CUDA else 10


@pytest.fixture(scope="module")
def results():
    rows = []
    copy_gbps = copy_bandwidth_gbps(DEVICE) if ON_CUDA else None
    yield {"rows": rows, "copy_gbps": copy_gbps}
    if ON_CUDA and rows:
        write_result("hidden_stats", {"copy_bandwidth_gbps": copy_gbps, "bytes_read": "2 * tokens * hidden * itemsize",
                                      "cases": rows})


def _skip_reason(impl):
    if impl == "triton" and not ON_CUDA:
        return "needs CUDA (the interpreter on CPU is a correctness tool, not something to time)"
    if impl == "torch_compile" and not ON_CUDA:
        return ("torch.compile of the reference spends ~60 s building its C++ kernel on a small CPU; "
                "the compiled case runs on CUDA only")
    return None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens,hidden,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_hidden_stats_throughput(benchmark, results, impl, tokens, hidden, dtype):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    h_in = torch.randn(tokens, hidden, generator=gen, device=DEVICE).to(dtype)
    h_out = (h_in.float() + 0.3 * torch.randn(tokens, hidden, generator=gen, device=DEVICE)).to(dtype)
    fn = hidden_stats_implementation(impl)

    # Also the warm-up (Triton JIT, torch.compile): a wrong kernel is not worth timing.
    got, want = new_stats_buffer(2, DEVICE).unbind(0)
    fn(h_in, h_out, None, got)
    accumulate_hidden_stats_reference(h_in, h_out, None, want)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)

    acc = new_stats_buffer(1, DEVICE)[0]

    def run_round():
        for _ in range(CALLS_PER_ROUND):
            fn(h_in, h_out, None, acc)
        if ON_CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"hidden_stats {tokens}x{hidden} {str(dtype).replace('torch.', '')}"
    benchmark.pedantic(run_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    seconds = benchmark.stats.stats.median / CALLS_PER_ROUND
    bytes_read = 2 * tokens * hidden * h_in.element_size()
    gbps = bandwidth_gbps(bytes_read, seconds)
    row = {"impl": impl, "tokens": tokens, "hidden": hidden, "dtype": str(dtype).replace("torch.", ""),
           "median_us": seconds * 1e6, "gbps": gbps, "bytes_read": bytes_read}
    if results["copy_gbps"]:
        row["fraction_of_copy_bandwidth"] = gbps / results["copy_gbps"]
        row["copy_bandwidth_gbps"] = results["copy_gbps"]
    benchmark.extra_info.update(row)
    results["rows"].append(row)

"""Per-layer gradient norms: fused Triton kernels vs the ways they are usually computed.

Trainable blocks: squared gradient norm per block of a Llama-3.2-1B-shaped model (16 blocks,
hidden 2048, intermediate 8192, 32 heads, 8 kv heads, head_dim 64; random bf16 tensors of the block
parameter shapes). ``grouped_sq_norms`` (one fused multi-tensor launch) against

* ``per_tensor_item``: IR-Tuning style, ``t.norm().item()`` for every tensor, summed per block;
* ``foreach_grouped``: ``torch._foreach_norm`` then squaring and ``index_add_`` per block;
* ``torch_path``: ``grouped_sq_norms`` under ``LAET_FAST_BACKEND=torch`` (its reference path).

Bytes read = all gradient bytes once; the GPU rows give GB/s and the fraction of the measured
copy bandwidth (goal: >= 1.5x faster than ``foreach_grouped``, >= 80% of copy bandwidth).

Frozen linear layers: ``||X^T dY||_F^2`` by ``linear_grad_sq_norm`` ("tiled", "gram", "auto")
against materialising ``dW = dY^T X`` with a matmul and taking its norm, and against the plain
weight-gradient matmul alone (goal: within 1.2x of it, no weight-sized allocation), at 4096x4096 and
4096x14336 with 512 to 8192 tokens. Rows give time and peak memory above the inputs.

On a CPU only the PyTorch paths run, at tiny sizes; the Triton cases are skipped. On a GPU the
suite writes ``benchmarks/results/grad_norm_trainable.json`` and ``grad_norm_frozen.json``.

    python -m pytest benchmarks/test_bench_grad_norm.py -q
"""
import pytest
import torch

from bench_utils import bandwidth_gbps, copy_bandwidth_gbps, write_result
from cases import foreach_grouped_norms, frozen_linear_norm_fn, llama_block_shapes, per_tensor_item_norms
from laet_fast.kernels import grad_norm
from laet_fast.kernels.grad_norm import (
    grouped_sq_norms,
    grouped_sq_norms_reference,
    linear_grad_sq_norm_reference,
    method_costs,
)

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
ROUNDS = 20 if ON_CUDA else 5
NEEDS_CUDA = "needs CUDA (the interpreter on CPU is a correctness tool, not something to time)"

# ---------------------------------------------------------------------------------------------
# Trainable blocks
# ---------------------------------------------------------------------------------------------

LLAMA_1B = dict(blocks=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64)
TINY = dict(blocks=2, hidden=64, intermediate=256, heads=4, kv_heads=2, head_dim=16)
MODEL = LLAMA_1B if ON_CUDA else TINY
TRAINABLE_IMPLS = ["triton", "foreach_grouped", "per_tensor_item", "torch_path"]


@pytest.fixture(scope="module")
def block_grads():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    tensors, groups = [], []
    for block in range(MODEL["blocks"]):
        for shape in llama_block_shapes(**MODEL):
            tensors.append((torch.randn(shape, generator=gen, device=DEVICE) * 1e-3).to(torch.bfloat16))
            groups.append(block)
    return tensors, groups


@pytest.fixture(scope="module")
def trainable_results():
    rows = []
    copy_gbps = copy_bandwidth_gbps(DEVICE) if ON_CUDA else None
    yield {"rows": rows, "copy_gbps": copy_gbps}
    if ON_CUDA and rows:
        baseline = {r["impl"]: r["median_us"] for r in rows}.get("foreach_grouped")
        for r in rows:
            r["speedup_vs_foreach_grouped"] = baseline / r["median_us"] if baseline else None
        write_result("grad_norm_trainable", {"model": "Llama-3.2-1B block shapes, bf16", **MODEL,
                                             "copy_bandwidth_gbps": copy_gbps,
                                             "bytes_read": "every gradient byte once", "cases": rows})


@pytest.mark.parametrize("impl", TRAINABLE_IMPLS)
def test_trainable_block_norms(benchmark, monkeypatch, trainable_results, block_grads, impl):
    if impl == "triton" and not ON_CUDA:
        pytest.skip(NEEDS_CUDA)
    if impl == "torch_path":
        monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    tensors, groups = block_grads
    num_blocks = MODEL["blocks"]
    index = torch.tensor(groups, device=DEVICE)

    def run(out):
        if impl in ("triton", "torch_path"):
            grouped_sq_norms(tensors, groups, out)
        elif impl == "foreach_grouped":
            foreach_grouped_norms(tensors, index, out)
        else:
            values = [0.0] * num_blocks
            per_tensor_item_norms(tensors, groups, values)
            out += torch.tensor(values, device=DEVICE)

    # A wrong result is not worth timing (and this call also compiles the kernel).
    check = torch.zeros(num_blocks, device=DEVICE)
    run(check)
    want = grouped_sq_norms_reference(tensors, groups, num_blocks)
    # foreach_grouped and per_tensor_item round each norm to bf16 / go through bf16 norms.
    rtol = 1e-4 if impl in ("triton", "torch_path") else 2e-2
    torch.testing.assert_close(check.double(), want, rtol=rtol, atol=0)

    out = torch.zeros(num_blocks, device=DEVICE)

    def run_round():
        run(out)
        if ON_CUDA:
            torch.cuda.synchronize()

    benchmark.group = "grad_norm trainable blocks"
    benchmark.pedantic(run_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    seconds = benchmark.stats.stats.median
    bytes_read = sum(t.numel() * t.element_size() for t in tensors)
    row = {"impl": impl, "tensors": len(tensors), "bytes_read": bytes_read, "median_us": seconds * 1e6,
           "gbps": bandwidth_gbps(bytes_read, seconds)}
    if trainable_results["copy_gbps"]:
        row["fraction_of_copy_bandwidth"] = row["gbps"] / trainable_results["copy_gbps"]
    benchmark.extra_info.update(row)
    trainable_results["rows"].append(row)


# ---------------------------------------------------------------------------------------------
# Frozen linear layers
# ---------------------------------------------------------------------------------------------

GPU_LINEAR_CASES = [(tokens, 4096, d_out) for d_out in (4096, 14336) for tokens in (512, 2048, 8192)]
CPU_LINEAR_CASES = [(16, 64, 96), (256, 64, 96)]
LINEAR_CASES = GPU_LINEAR_CASES if ON_CUDA else CPU_LINEAR_CASES
FROZEN_IMPLS = ["tiled", "gram", "auto", "torch_path_auto", "materialise", "matmul_only"]


@pytest.fixture(scope="module")
def frozen_results():
    rows = []
    yield rows
    if ON_CUDA and rows:
        matmul = {(r["tokens"], r["in"], r["out"]): r["median_us"] for r in rows if r["impl"] == "matmul_only"}
        for r in rows:
            plain = matmul.get((r["tokens"], r["in"], r["out"]))
            r["time_vs_plain_matmul"] = r["median_us"] / plain if plain else None
        times = {(r["tokens"], r["in"], r["out"], r["impl"]): r["median_us"] for r in rows}
        for r in rows:
            key = (r["tokens"], r["in"], r["out"])
            if r["impl"] == "auto" and (*key, "tiled") in times and (*key, "gram") in times:
                faster = min(("tiled", "gram"), key=lambda m: times[(*key, m)])
                # The rule is right when it picked the faster kernel; else by how much it lost.
                r["auto_rule"]["measured_faster"] = faster
                r["auto_rule"]["measured_gram_over_tiled"] = times[(*key, "gram")] / times[(*key, "tiled")]
        write_result("grad_norm_frozen", {"dtype": "bfloat16", "x": "[tokens, in]", "dy": "[tokens, out]",
                                          "peak_extra_bytes": "max_memory_allocated delta over the inputs",
                                          "gram_relative_throughput_estimate": grad_norm.GRAM_RELATIVE_THROUGHPUT,
                                          "cases": rows})


@pytest.mark.parametrize("impl", FROZEN_IMPLS)
@pytest.mark.parametrize("tokens,d_in,d_out", LINEAR_CASES)
def test_frozen_linear_norm(benchmark, monkeypatch, frozen_results, impl, tokens, d_in, d_out):
    if impl in ("tiled", "gram", "auto") and not ON_CUDA:
        pytest.skip(NEEDS_CUDA)
    if impl == "torch_path_auto":
        monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(tokens, d_in, generator=gen, device=DEVICE).to(torch.bfloat16)
    dy = (torch.randn(tokens, d_out, generator=gen, device=DEVICE) * 1e-2).to(torch.bfloat16)
    out = torch.zeros(1, device=DEVICE)
    fn = frozen_linear_norm_fn(impl, x, dy, out)

    fn()  # compiles / autotunes the kernel outside the timing
    if impl != "matmul_only":
        out.zero_()
        fn()
        want = linear_grad_sq_norm_reference(x, dy)
        # bf16 dW in "materialise" rounds each entry; the kernels accumulate in float32.
        rtol = 1e-2 if impl == "materialise" else 1e-4
        torch.testing.assert_close(out[0].double(), want, rtol=rtol, atol=0)

    peak_extra = None
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - base

    def run_round():
        fn()
        if ON_CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"grad_norm frozen {tokens}x{d_in}x{d_out}"
    benchmark.pedantic(run_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:
        return
    seconds = benchmark.stats.stats.median
    row = {"impl": impl, "tokens": tokens, "in": d_in, "out": d_out, "median_us": seconds * 1e6,
           "tflops_as_matmul": 2 * tokens * d_in * d_out / seconds / 1e12, "peak_extra_bytes": peak_extra,
           "weight_bytes_bf16": d_in * d_out * 2,
           # What "auto" weighed (flops, estimated relative throughput, occupancy) and what it chose.
           "auto_rule": method_costs(tokens, d_in, d_out, True, grad_norm._device_sm_count(DEVICE))}
    benchmark.extra_info.update(row)
    frozen_results.append(row)


# ---------------------------------------------------------------------------------------------
# The shape rule's tile sizes against every candidate (what autotuning would have chosen)
# ---------------------------------------------------------------------------------------------


def _candidate_configs(method):
    if method == "tiled":
        return [dict(BLOCK_IN=bi, BLOCK_OUT=bo, BLOCK_T=bt, GROUP_IN=8, num_warps=w, num_stages=st)
                for bi, bo, bt, w, st in grad_norm.TILED_CONFIGS_TENSOR_CORES]
    return [dict(BLOCK_T=bt, BLOCK_K=bk, num_warps=w, num_stages=st)
            for bt, bk, w, st in grad_norm.GRAM_CONFIGS_TENSOR_CORES]


def _cuda_median_us(fn, rounds=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_linear_configs(cases=None, device="cuda", timer=None) -> dict:
    """Time every candidate tile configuration of both kernels against the one the shape rule picks.

    ``cases``: (tokens, in, out) triples, bf16 (default: the frozen-linear cases plus few-token ones).
    Returns (and writes as ``benchmarks/results/grad_norm_configs.json``) one row per case and
    method: each candidate's median time, the rule's pick, and rule time / best time (goal <= 1.1).
    Needs CUDA (``device`` and ``timer``, a function of a callable giving microseconds, exist for a
    dry run of this code on CPU).
    """
    timer = timer or _cuda_median_us
    cases = cases or GPU_LINEAR_CASES + [(64, 4096, 4096), (256, 4096, 1024), (1024, 4096, 14336)]
    device = torch.device(device)
    sm_count = grad_norm._device_sm_count(device)
    rows = []
    for tokens, d_in, d_out in cases:
        gen = torch.Generator(device=device).manual_seed(2)
        x = torch.randn(tokens, d_in, generator=gen, device=device).to(torch.bfloat16)
        dy = (torch.randn(tokens, d_out, generator=gen, device=device) * 1e-2).to(torch.bfloat16)
        out = torch.zeros(1, device=device)
        for method in ("tiled", "gram"):
            picked = (grad_norm.tiled_config(d_in, d_out, True, sm_count) if method == "tiled"
                      else grad_norm.gram_config(tokens, True, sm_count))
            configs = _candidate_configs(method)
            configs += [] if picked in configs else [picked]
            timed = [{"config": c, "median_us": timer(
                lambda c=c: grad_norm.launch_linear_kernel(x, dy, out, method, c))} for c in configs]
            best = min(t["median_us"] for t in timed)
            rule_us = next(t["median_us"] for t in timed if t["config"] == picked)
            rows.append({"tokens": tokens, "in": d_in, "out": d_out, "method": method, "candidates": timed,
                         "rule_config": picked, "rule_over_best": rule_us / best,
                         "auto_rule": method_costs(tokens, d_in, d_out, True, sm_count)})
    result = {"dtype": "bfloat16", "goal": "rule_over_best <= 1.1", "cases": rows}
    write_result("grad_norm_configs", result)
    return result


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason=NEEDS_CUDA)
def test_shape_rule_configs_against_candidates():
    result = bench_linear_configs()
    worst = max(r["rule_over_best"] for r in result["cases"])
    print(f"shape rule: worst case {worst:.2f}x the best candidate")

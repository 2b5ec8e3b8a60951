"""Every Triton kernel compiled ahead of time for sm_80/89/90 without a GPU (benchmarks/aot_table.py).

The compile runs in a subprocess without the interpreter; what it reports is checked here against
the kernels' own source (which kernels exist, which may spill and why), and the occupancy rule
against values worked by hand from NVIDIA's published limits. Under the interpreter, the launchers
are checked to pin ``enable_fp_fusion`` and to pass what the table compiles.
"""
import ast
import importlib.metadata
import json
import os
import sys

import pytest
import torch

from compile_without_gpu import REPO, RecordingKernel, run_without_interpreter
from laet_fast.kernels import grad_norm, hidden_stats, pooling, slerp

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import aot_table  # noqa: E402

TARGETS = ("sm_80", "sm_89", "sm_90")
KERNEL_MODULES = {"hidden_stats": hidden_stats, "grad_norm": grad_norm, "pooling": pooling, "slerp": slerp}


def _jit_kernels() -> dict[str, tuple[str, str]]:
    """``{kernel name: (module name, docstring)}`` of every ``@triton.jit`` function in kernels/, read
    from the source files (not from the table's list)."""
    found = {}
    folder = os.path.join(REPO, "kernels")
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".py"):
            continue
        with open(os.path.join(folder, file)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d.func if isinstance(d, ast.Call) else d) == "triton.jit" for d in node.decorator_list):
                found[node.name] = (file.removesuffix(".py"), ast.get_docstring(node) or "")
    return found


def _check_table(result: dict) -> None:
    """The table covers every kernel on every target, and every compile is usable on its GPU."""
    kernels = _jit_kernels()
    assert set(KERNEL_MODULES) == {module for module, _ in kernels.values()}
    assert result["failures"] == []
    covered = {(row["kernel"], row["target"]) for row in result["rows"]}
    assert covered == {(kernel, target) for kernel in kernels for target in TARGETS}
    for row in result["rows"]:
        module, doc = kernels[row["kernel"]]
        where = f"{row['kernel']} {row['target']} {row['dtypes']} {row['constexprs']}"
        assert "error" not in row, where
        assert row["enable_fp_fusion"] is KERNEL_MODULES[module].ENABLE_FP_FUSION, where
        assert 0 < row["registers"] <= 255, where
        if row["spill_stores"] or row["spill_loads"]:
            assert "Spills:" in doc, f"{where} spills {row['spill_stores']} B; its docstring does not say why"
        assert row["blocks_per_sm"] >= 1, where


@pytest.mark.slow
def test_every_kernel_compiles_for_a100_rtx4090_h100_without_a_gpu(tmp_path):
    """All launch configurations at SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B shapes: no compile
    error, no spill a kernel's docstring does not explain, every kernel resident on every SM."""

    out = tmp_path / "out"
    done = run_without_interpreter([sys.executable, os.path.join("benchmarks", "aot_table.py"), "--out-dir", str(out)],
                                   tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out / "aot_compile.json") as f:
        result = json.load(f)
    # As bench_utils records them: the installed distributions' versions (a CUDA wheel's lack torch's "+cu130").
    assert (result["triton_version"], result["torch_version"]) == (importlib.metadata.version("triton"),
                                                                   importlib.metadata.version("torch"))
    _check_table(result)
    with open(out / "aot_compile.md") as f:
        assert f.read().count("\n| _") == len(result["rows"])


@pytest.mark.parametrize("name", ["aot_compile", "aot_compile_triton3.6"])
def test_committed_table_covers_every_kernel(name):
    """The committed tables (Triton 3.9, and 3.6 as on the lent GPU machine) are of the kernels as they are."""
    with open(os.path.join(REPO, "benchmarks", "results", f"{name}.json")) as f:
        _check_table(json.load(f))


@pytest.mark.parametrize("regs, smem, num_warps, cc, blocks, limited_by", [
    # 64 registers: 2048 per warp, 8 warps per 16384-register sub-partition, 32 per SM = 4 blocks of 8.
    (64, 32, 8, 90, 4, "registers"),
    # 255 registers round up to 256: 8192 per warp, 2 per sub-partition, 8 per SM = 2 blocks of 4.
    (255, 0, 4, 80, 2, "registers"),
    # 72 KiB + 1 KiB reserved per block: 1 block in sm_89's 100 KiB, 3 in sm_90's 228 KiB.
    (32, 72 * 1024, 4, 89, 1, "shared memory"),
    (32, 72 * 1024, 4, 90, 3, "shared memory"),
    # 32 registers, 4 warps: 16 blocks by registers and by sm_80's 64 warps; sm_89 has 48 warps = 12.
    (32, 0, 4, 80, 16, "warps"),
    (32, 0, 4, 89, 12, "warps"),
    # 1-warp blocks: sm_89 holds at most 24 blocks.
    (16, 0, 1, 89, 24, "blocks"),
    # More shared memory than one block may have on sm_89 (99 KiB), or registers than a thread may have.
    (32, 100 * 1024, 4, 89, 0, "shared memory"),
    (256, 0, 4, 90, 0, "registers"),
])
def test_occupancy_from_registers_and_shared_memory(regs, smem, num_warps, cc, blocks, limited_by):
    got = aot_table.occupancy(regs, smem, num_warps, aot_table.TARGETS[cc])
    warps = {80: 64, 89: 48, 90: 64}[cc]
    assert got == {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
                   "occupancy": blocks * num_warps / warps, "limited_by": limited_by}


def _launch_hidden_stats():
    h = torch.randn(40, 72)
    hidden_stats.accumulate_hidden_stats(h, h + 1, torch.ones(40, dtype=torch.int64), torch.zeros(5))


def _launch_pooling():
    pooling.masked_pool(torch.randn(2, 5, 72), torch.ones(2, 5, dtype=torch.int64), "mean")


def _launch_grouped():
    grad_norm.grouped_sq_norms([torch.randn(300)], [0], torch.zeros(1))


def _launch_linear(method):
    return lambda: grad_norm.linear_grad_sq_norm(torch.randn(37, 72), torch.randn(37, 136), torch.zeros(1), method)


def _launch_slerp():
    slerp.slerp(torch.randn(3000), torch.randn(3000), 0.3)


@pytest.mark.parametrize("module, kernel, launch, builder", [
    pytest.param(module, kernel, launch, builder, id=kernel) for module, kernel, launch, builder in (
        (hidden_stats, "_hidden_stats_kernel", _launch_hidden_stats, aot_table.hidden_stats_launches),
        (pooling, "_masked_pool_kernel", _launch_pooling, aot_table.pooling_launches),
        (grad_norm, "_grouped_sq_norm_kernel", _launch_grouped, aot_table.grouped_sq_norm_launches),
        (grad_norm, "_xt_dy_sq_norm_tiled_kernel", _launch_linear("tiled"), aot_table.linear_launches),
        (grad_norm, "_gram_sq_norm_kernel", _launch_linear("gram"), aot_table.linear_launches),
        (slerp, "_slerp_reduce_kernel", _launch_slerp, aot_table.slerp_launches),
        (slerp, "_slerp_write_kernel", _launch_slerp, aot_table.slerp_launches),
    )
])
def test_launchers_pin_fp_fusion_and_the_table_compiles_their_launches(monkeypatch, module, kernel, launch, builder):
    """Each launch passes the module's ENABLE_FP_FUSION (Triton 3.10 changes the default), and the
    table builds the same arguments (count, keywords, fp-fusion choice) as the launcher passes."""
    stub = RecordingKernel()
    monkeypatch.setattr(module, kernel, stub)
    launch()
    assert stub.launches, f"{kernel} was not launched"
    _, args, kwargs = stub.launches[0]
    assert kwargs["enable_fp_fusion"] is module.ENABLE_FP_FUSION
    table_launches = [item for item in builder(aot_table.TARGETS[90], monkeypatch.setattr) if item.kernel is stub]
    assert table_launches
    for item in table_launches:
        assert (len(item.args), set(item.kwargs)) == (len(args), set(kwargs))
        assert item.kwargs["enable_fp_fusion"] is module.ENABLE_FP_FUSION

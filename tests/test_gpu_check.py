"""benchmarks/gpu_check.py: the dry run, the step runner (deadlines, overruns, errors), the JSON files, and
every step at tiny sizes on the CPU (the code path the GPU run takes, not its numbers)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402
import gpu_steps  # noqa: E402

TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True,
                  max_position_embeddings=128)


def _ctx(tmp_path, name="x", budget=60.0, deadline=None):
    step = gpu_check.Step(name, "gpu_steps:step_env", budget, {"size": 1}, "a test step")
    header = {"device": "test", "date_utc": "now"}
    return gpu_check.StepContext(step, str(tmp_path), deadline or time.time() + budget, header)


def test_dry_run_lists_every_step():
    done = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--dry-run"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    for step in gpu_check.STEPS:
        assert f"{step.name}: budget {step.budget_s:.0f} s" in done.stdout
        assert json.dumps(step.config, sort_keys=True) in done.stdout
    assert "MISSING" not in done.stdout


def test_step_functions_exist_and_file_names_are_valid():
    names = [step.file for step in gpu_check.STEPS] + [gpu_check.SUMMARY_FILE]
    assert len(names) + 1 <= gpu_check.MAX_FILES  # + the log the command line tees
    for name in names:
        assert gpu_check.SAFE_NAME.match(name), name
    for step in gpu_check.STEPS:
        assert callable(gpu_check.resolve(step.fn)), step.fn
    assert sum(step.budget_s for step in gpu_check.STEPS) <= gpu_check.TOTAL_S <= 450
    gpu_check.check_file_names(names)
    with pytest.raises(ValueError, match="letters, digits"):
        gpu_check.check_file_names(["memory 8b.json"])
    with pytest.raises(ValueError, match="exceed"):
        gpu_check.check_file_names([f"f{i}.json" for i in range(8)])


def test_the_readme_command_line_fits_the_device_tool():
    with open(os.path.join(BENCH, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    line = text.split("<!-- gpu_check command -->")[1].split("```")[1].strip().removeprefix("bash").strip()
    assert len(line) <= 2000
    assert "benchmarks/gpu_check.py --out $OUT" in line and ".whl/*.whl" in line


def test_write_json_is_atomic_and_context_records_cases(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.run_case("fine", lambda: {"value": 1.5}, impl="a")
    ctx.run_case("broken", lambda: 1 / 0, impl="b")
    ctx.run_case("after", lambda: {"value": 2}, impl="c")
    data = json.loads((tmp_path / "x.json").read_text())
    assert [c["case"] for c in data["cases"]] == ["fine", "broken", "after"]
    assert data["cases"][1]["error"].startswith("ZeroDivisionError") and "traceback" in data["cases"][1]
    assert data["cases"][2]["value"] == 2 and data["device"] == "test" and data["config"] == {"size": 1}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_context_stops_at_its_deadline(tmp_path):
    ctx = _ctx(tmp_path, deadline=time.time() + 0.3)
    ran = []
    for i in range(20):
        ctx.run_case(f"c{i}", lambda: ran.append(time.sleep(0.1)) or {})
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["status"] == "stopped_at_deadline"
    assert 1 <= len(ran) <= 4
    assert data["cases"][-1]["skipped"] == "step deadline reached"


FAKE_STEPS = '''
import signal, time

def quick(ctx):
    ctx.run_case("quick", lambda: {"value": 1})

def stubborn(ctx):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a hung sub-case: only SIGKILL ends it
    ctx.run_case("first", lambda: {"value": 1})
    ctx.run_case("hangs", lambda: time.sleep(120))

def boom(ctx):
    raise RuntimeError("step failed")

def polite(ctx):
    for i in range(200):
        ctx.run_case(f"c{i}", lambda: time.sleep(0.25) or {"i": i})
'''


@pytest.fixture
def fake_steps(tmp_path, monkeypatch):
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "fake_gpu_steps.py").write_text(textwrap.dedent(FAKE_STEPS))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 3.0)
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 1.0)
    return lambda name, fn, budget: gpu_check.Step(name, f"fake_gpu_steps:{fn}", budget, {}, fn)


@pytest.mark.slow
def test_runner_kills_an_overrunning_step_and_keeps_to_the_global_budget(tmp_path, fake_steps, capsys):
    out = tmp_path / "out"
    # Budgets leave a loaded CI machine several seconds to start Python and torch in each step process.
    steps = [fake_steps("stubborn", "stubborn", 12), fake_steps("later", "quick", 30)]
    begin = time.time()
    summary = gpu_check.run_all(steps, str(out), total_s=14)
    assert time.time() - begin < 25
    stubborn = json.loads((out / "stubborn.json").read_text())
    assert stubborn["status"] == "timeout" and "killed after" in stubborn["info"]["runner"]
    assert stubborn["cases"][0]["value"] == 1  # what it measured before hanging is kept
    later = json.loads((out / "later.json").read_text())
    assert later["status"] == "skipped" and "not started" in later["info"]["runner"]
    assert summary["steps"]["stubborn"]["status"] == "timeout"
    assert sorted(os.listdir(out)) == ["later.json", "stubborn.json", "summary.json"]
    assert "stubborn" in capsys.readouterr().out


@pytest.mark.slow
def test_runner_records_errors_and_soft_deadlines(tmp_path, fake_steps):
    out = tmp_path / "out"
    steps = [fake_steps("boom", "boom", 20), fake_steps("polite", "polite", 12)]
    summary = gpu_check.run_all(steps, str(out), total_s=60)
    boom = json.loads((out / "boom.json").read_text())
    assert boom["status"] == "error" and "step failed" in boom["info"]["error"]
    polite = json.loads((out / "polite.json").read_text())
    assert polite["status"] == "stopped_at_deadline", polite["info"]
    assert polite["cases"] and polite["cases"][-1]["skipped"] == "step deadline reached"
    assert polite["elapsed_s"] < 12
    assert summary["steps"] == {"boom": {"status": "error", "elapsed_s": boom["elapsed_s"]},
                                "polite": {"status": "stopped_at_deadline", "elapsed_s": polite["elapsed_s"]}}
    assert any(goal["measured"] is None for goal in summary["goals"])


def test_env_step_cpu(tmp_path):
    ctx = _ctx(tmp_path, "env")
    gpu_steps.step_env(ctx, copy_bytes=1 << 20, copy_repeats=2, matmul_n=32)
    cases = {c["case"]: c for c in ctx.cases}
    assert cases["copy_bandwidth"]["copy_bandwidth_gbps"] > 0
    assert cases["matmul_bf16"]["tflops"] > 0
    assert cases["bitsandbytes_nf4"]["ok"], cases["bitsandbytes_nf4"]
    assert "error" not in cases["triton_backend"]


def test_pytest_step_counts_results(tmp_path):
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_sample.py").write_text(textwrap.dedent('''
        import pytest

        def test_ok():
            pass

        def test_bad():
            assert 1 == 2, "one is not two"

        @pytest.mark.skip(reason="no")
        def test_skipped():
            pass
    '''))
    (tests / "test_broken.py").write_text("import a_package_this_machine_lacks\n")
    result = gpu_steps.run_pytest([str(tests)], str(tmp_path), timeout=60)
    # The module that cannot be imported is one error; the other module still runs.
    assert (result["passed"], result["failed"], result["errors"], result["skipped"]) == (1, 1, 1, 1)
    failing = {f["test"].rsplit(":", 1)[-1]: f for f in result["failing"]}
    assert set(failing) == {"test_bad", "suite.test_broken"} and result["source"] == "junit"
    assert "one is not two" in failing["test_bad"]["message"]
    verbose = "suite/test_a.py::test_x PASSED [ 50%]\nsuite/test_a.py::test_y FAILED [100%]\n"
    counted = gpu_steps._count_verbose(verbose)
    assert (counted["passed"], counted["failed"]) == (1, 1)


def test_kernels_step_cpu_tiny(tmp_path):
    ctx = _ctx(tmp_path, "kernels")
    gpu_steps.step_kernels(ctx, hidden_stats=[[40, 96, "float32"]],
                           grad_norm_shape=dict(blocks=2, hidden=48, intermediate=80, heads=4, kv_heads=2, head_dim=12),
                           frozen_linear=[[24, 48, 80]], slerp_shape=[33, 70], pooling_shape=[3, 17, 40],
                           dtype="float32", compile_refs=False, target_s=0.001)
    data = json.loads((tmp_path / "kernels.json").read_text())
    measured = [c for c in data["cases"] if "median_us" in c]
    assert {c["kernel"] for c in measured} >= {"hidden_stats", "grouped_norms", "frozen_linear"}
    assert not [c for c in data["cases"] if "error" in c], [c["error"] for c in data["cases"] if "error" in c]
    for row in measured:
        assert row["gbps"] > 0 and row["min_bytes"] > 0
        if "check" in row:
            assert row["check"]["ok"], row
    for kernel in ("slerp", "pooling"):
        present = [c for c in data["cases"] if c.get("kernel") == kernel]
        assert present and (present[0].get("absent") or "median_us" in present[0])
    frozen = [c for c in measured if c["kernel"] == "frozen_linear" and c["kind"] == "kernel"]
    assert {c["impl"] for c in frozen} == {"tiled", "gram"}
    assert all("time_vs_matmul_only" in c and "materialise" in c["speedup_over"] for c in frozen)
    assert not [c for c in data["cases"] if c.get("kind") == "compile"]


def test_memory_step_cpu_tiny(tmp_path):
    """The memory step on a tiny Llama built on meta and materialised into NF4: plan vs CPU allocations."""
    pytest.importorskip("bitsandbytes")
    from test_bench_memory import TINY  # the tiny shape the memory suite checks the planner on

    ctx = _ctx(tmp_path, "memory")
    gpu_steps.step_memory(ctx, shapes=[TINY], ks=[2], seq=24, batch=1, quantize="nf4",
                          optimizer="adamw8bit", warmup=1, steps=1)
    (row,) = ctx.cases
    assert "error" not in row, row.get("traceback")
    assert row["shape"] == "custom" and row["k"] == 2 and row["plan"]["quantize_frozen"] == "nf4"
    assert abs(row["planner_error"]) < 0.10
    with pytest.raises(ValueError, match="AdamW8bit"):
        gpu_steps.step_memory(ctx, shapes=[TINY], ks=[2], seq=24, batch=1, quantize="nf4",
                              optimizer="adamw", warmup=1, steps=1)


def test_step_time_step_cpu_tiny(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")  # the interpreter would time Python, not the step
    ctx = _ctx(tmp_path, "step_time")
    gpu_steps.step_step_time(ctx, shape=TINY_LLAMA, seq=16, batch=1, k=2, lora_r=16, warmup=1, steps=1,
                             modes=["laet_nf4", "probe_forward", "probe_grad_norms", "off_full", "qlora_r16",
                                    "lora_r16"])
    rows = {c["mode"]: c for c in ctx.cases}
    assert not [r for r in rows.values() if "error" in r], [r.get("traceback") for r in rows.values()]
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["probe_grad_norms"]["scores_finite"] and rows["probe_grad_norms"]["scored_blocks"] == 4
    overheads = json.loads((tmp_path / "step_time.json").read_text())["overheads"]
    assert set(overheads) >= {"probe_forward_overhead_vs_laet_nf4", "probe_grad_norms_overhead_vs_off_full",
                              "qlora_r16_time_over_laet_nf4"}


def test_summarize_goals():
    payloads = {
        "pytest_gpu": {"cases": [{"passed": 9, "failed": 0, "errors": 0}]},
        "kernels": {"cases": [
            {"kernel": "hidden_stats", "size": "s", "kind": "kernel", "median_us": 1.0,
             "fraction_of_copy_bandwidth": 0.85},
            {"kernel": "grouped_norms", "size": "g", "kind": "kernel", "median_us": 1.0,
             "speedup_over": {"foreach_grouped": 1.2}},
            {"kernel": "frozen_linear", "size": "f", "kind": "kernel", "impl": "tiled", "median_us": 1.0,
             "time_vs_matmul_only": 1.5},
            {"kernel": "frozen_linear", "size": "f", "kind": "kernel", "impl": "gram", "median_us": 1.0,
             "time_vs_matmul_only": 1.1},
        ]},
        "memory": {"cases": [{"shape": "llama-3.1-8b", "k": 4, "peak_gib": 11.0, "planner_error": -0.12},
                             {"shape": "llama-3.1-8b", "k": 2, "peak_gib": 9.0, "planner_error": 0.05}]},
        "step_time": {"overheads": {"probe_forward_overhead_vs_laet_nf4": 0.02}},
    }
    goals = {g["goal"]: g for g in gpu_steps.summarize_goals(payloads)}
    met = {name: g["met"] for name, g in goals.items()}
    assert met["pytest -m gpu: failures + errors"] is True
    assert met["hidden stats s: fraction of copy bandwidth"] is True
    assert met["grouped norms g: speedup over _foreach_norm"] is False
    assert goals["frozen-linear norm f: best kernel time / dW matmul"]["measured"] == 1.1
    assert met["planner: largest |plan - max_memory_allocated| / measured"] is False
    assert met["llama-3.1-8b k=4 NF4 AdamW8bit seq 1024: peak GiB"] is True
    assert met["llama-3.2-3b k=4 NF4 AdamW8bit seq 1024: peak GiB"] is None
    assert met["probe gradient norms: overhead vs the same full backward"] is None
    assert all(g["met"] is None for g in gpu_steps.summarize_goals({}))


@pytest.mark.slow
def test_real_steps_through_the_runner_at_tiny_sizes(tmp_path):
    """env then kernels in their own processes, as on the GPU: kernels reads the copy bandwidth env measured."""
    by_name = {step.name: step for step in gpu_check.STEPS}
    tiny = dict(hidden_stats=[[40, 96, "float32"]], grad_norm_shape=dict(blocks=2, hidden=48, intermediate=80, heads=4,
                kv_heads=2, head_dim=12), frozen_linear=[], slerp_shape=[33, 70], pooling_shape=[3, 17, 40],
                dtype="float32", compile_refs=False, target_s=0.001)
    steps = [gpu_check.dataclasses.replace(by_name["env"],
                                           config=dict(copy_bytes=1 << 20, copy_repeats=2, matmul_n=32)),
             gpu_check.dataclasses.replace(by_name["kernels"], config=tiny)]
    out = tmp_path / "out"
    summary = gpu_check.run_all(steps, str(out), total_s=150)
    assert {name: s["status"] for name, s in summary["steps"].items()} == {"env": "ok", "kernels": "ok"}
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["info"]["copy_bandwidth_source"] == "env.json"
    assert kernels["torch_version"] and kernels["date_utc"]
    assert all("fraction_of_copy_bandwidth" in c for c in kernels["cases"] if "median_us" in c)
    assert summary["device"] == kernels["device"] and summary["goals"]


def test_the_memory_step_sets_the_cpu_measurement_beside_the_gpu_peak():
    """The committed CPU run of the 8B shape (benchmarks/memory_cpu.py), found by its settings."""
    figure = gpu_steps.cpu_figure("llama-3.1-8b", 4, 1024, "adamw8bit")
    assert figure is not None and figure["source"] == "memory_cpu_llama-3.1-8b.json"
    assert figure["measured_forward_backward_peak_gib"] <= figure["measured_optimizer_step_peak_gib"]
    assert abs(figure["measured_forward_backward_peak_gib"] / figure["planned_peak_allocated_gib"] - 1) < 0.05
    assert gpu_steps.cpu_figure("llama-3.1-8b", 3, 1024, "adamw8bit") is None  # no run with those settings
    assert gpu_steps.cpu_figure("llama-3.2-1b", 4, 1024, "adamw8bit") is None  # no such file


def test_the_kernels_step_sets_the_compile_table_beside_the_bandwidth():
    """On a GPU, step_kernels records what the CPU's ahead-of-time compile found for its architecture."""
    table = gpu_steps.compile_table_summary("sm_90")
    assert table["target"] == "sm_90" and "_hidden_stats_kernel" in table["kernels"]
    for entry in table["kernels"].values():
        assert entry["configurations"] >= 1 and entry["registers"][0] <= entry["registers"][1] <= 255
        assert 0 < entry["occupancy"][0] <= entry["occupancy"][1] <= 1
    assert "missing" in gpu_steps.compile_table_summary("sm_75")

"""One command that measures every GPU claim of laet_fast, in at most about 7 minutes.

    python benchmarks/gpu_check.py --out DIR        # on the GPU machine (benchmarks/README.md has the full line)
    python benchmarks/gpu_check.py --dry-run        # anywhere: the steps, their configuration and time budgets

The steps (``STEPS``) run in order, each in its own Python process under its own time budget:

1. ``env``: device, library versions, measured copy bandwidth and bf16 matmul rate (the ceilings);
2. ``pytest_gpu``: ``pytest -m gpu tests`` with the compiled kernels;
3. ``kernels``: every Triton kernel at its goal size against its eager and ``torch.compile`` references;
4. ``memory``: ``max_memory_allocated`` against ``plan_memory`` on Llama-3.2-1B/3B/3.1-8B shapes;
5. ``step_time``: training-step time on the 8B shape, laet_fast against QLoRA and bf16 LoRA, and the
   probe's overhead.

Each step writes ``DIR/<step>.json`` as soon as it ends (and after every sub-case while it runs, by an
atomic rename, so a step killed half-way still leaves what it measured). A step that reaches its budget is
stopped: first by its own deadline, checked between sub-cases; if a sub-case hangs, by this process, which
kills the step's process group (and a watchdog thread in the step ends it if this process died first).
Every step gets at most its budget and never more than what is left of the global ``--total-s``; a step
with too little time left is recorded as skipped. At the end ``summary.json``
lists every goal with its measured figure. Nothing here imports CUDA code: the step functions live in
``gpu_steps.py`` and run in the child processes only.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_FILES = 8  # the device tool brings back at most 8 files from the output folder
TOTAL_S = 420.0  # the whole check; a second run then fits in one 15-minute device lease
MIN_STEP_S = 8.0  # below this a step is not started (a process with torch needs a few seconds to start)
KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL of a step that overran
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the check: ``fn`` is ``"module:function"``, called as ``fn(ctx, **config)``."""

    name: str
    fn: str
    budget_s: float
    config: dict
    about: str

    @property
    def file(self) -> str:
        return f"{self.name}.json"


STEPS: list[Step] = [
    Step("env", "gpu_steps:step_env", 20, dict(copy_bytes=1 << 31, copy_repeats=20, matmul_n=8192),
         "device, versions, device-to-device copy bandwidth and bf16 matmul rate (the ceilings)"),
    Step("pytest_gpu", "gpu_steps:step_pytest", 75, dict(args=["-m", "gpu", "tests"]),
         "pytest -m gpu tests, compiled kernels (TRITON_INTERPRET=0)"),
    Step("kernels", "gpu_steps:step_kernels", 150, dict(
        hidden_stats=[[16384, 4096, "bfloat16"]],
        grad_norm_shape="llama-3.1-8b",
        frozen_linear=[[tokens, 4096, d_out] for d_out in (4096, 14336) for tokens in (512, 2048, 8192)],
        slerp_shape=[4096, 14336],
        pooling_shape=[16, 1024, 4096],
        dtype="bfloat16",
        compile_refs=True,
    ), "hidden stats, grouped norms, frozen-linear norm, SLERP, pooling: GB/s, fraction of copy, vs eager/compile"),
    Step("memory", "gpu_steps:step_memory", 80, dict(
        # The 8B goal first: if the budget runs out, the smaller shapes are what is lost.
        shapes=["llama-3.1-8b", "llama-3.2-3b", "llama-3.2-1b"], ks=[4, 2], seq=1024, batch=1,
        quantize="nf4", optimizer="adamw8bit", warmup=2, steps=3,
    ), "peak allocated vs plan_memory and beside the CPU's measurement (memory_cpu.py), meta-built NF4 models, "
       "k=2 and 4, AdamW8bit"),
    Step("step_time", "gpu_steps:step_step_time", 95, dict(
        shape="llama-3.1-8b", seq=1024, batch=1, k=4, lora_r=16, warmup=2, steps=5,
        modes=["laet_nf4", "probe_forward", "probe_grad_norms", "off_full", "qlora_r16", "lora_r16"],
    ), "8B step time and tokens/s: laet_fast k=4 NF4, QLoRA r=16, bf16 LoRA r=16; probe overhead"),
]


class Interrupted(BaseException):
    """SIGTERM/SIGINT: stop now, write what there is. A BaseException so no sub-case swallows it."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def resolve(fn: str) -> Callable:
    """``"module:function"`` -> the function (``benchmarks/`` and the repository root on ``sys.path``)."""
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


class StepContext:
    """What a step function gets: its deadline, and a JSON record that is saved after every sub-case.

    ``cases`` is a list of dicts, one per measured sub-case; ``info`` holds step-wide values. ``derive``,
    when a step sets it, is called on ``cases`` before every save (ratios between sub-cases), so a
    partial file has them too.
    """

    def __init__(self, step: Step, out_dir: str, deadline: float, header: dict | None = None):
        self.step = step
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, step.file)
        self.deadline = deadline
        self.started = time.time()
        self.header = header or {}
        self.cases: list[dict] = []
        self.info: dict[str, Any] = {}
        self.status = "running"
        self.derive: Callable[[list[dict]], dict] | None = None

    def time_left(self) -> float:
        return self.deadline - time.time()

    def out_of_time(self, need_s: float = 0.0) -> bool:
        return self.time_left() <= need_s

    def payload(self) -> dict:
        derived = {}
        if self.derive is not None:
            try:
                derived = self.derive(self.cases)
            except Exception as error:  # a partial record must still be written
                derived = {"derive_error": repr(error)}
        return {**self.header, "step": self.step.name, "about": self.step.about, "status": self.status,
                "config": self.step.config, "budget_s": self.step.budget_s,
                "elapsed_s": round(time.time() - self.started, 2), "info": self.info, "cases": self.cases,
                **derived}

    def save(self, status: str | None = None) -> None:
        if status is not None:
            self.status = status
        write_json(self.path, self.payload())

    def run_case(self, name: str, fn: Callable[[], dict], need_s: float = 0.0, **labels) -> dict | None:
        """Run one sub-case unless the deadline is near; record its result or its error; save.

        ``labels`` go into the record beside what ``fn()`` returns. An exception is recorded (with the
        end of its traceback) and the step carries on with the next sub-case. Returns the record, or
        None when the sub-case was skipped for time.
        """
        record = {"case": name, **labels}
        if self.out_of_time(need_s):
            record["skipped"] = "step deadline reached"
            self.cases.append(record)
            self.status = "stopped_at_deadline"
            self.save()
            return None
        begin = time.time()
        try:
            record.update(fn() or {})
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {error}"[:2000]
            record["traceback"] = traceback.format_exc()[-3000:]
            _after_error()
        record["case_s"] = round(time.time() - begin, 3)
        self.cases.append(record)
        self.save()
        print(f"  [{self.step.name}] {name}: " + _short(record), flush=True)
        return record


def _after_error() -> None:
    # An out-of-memory error leaves cached blocks behind; free them so the next sub-case gets a clean start.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass


def _short(record: dict) -> str:
    if "error" in record:
        return "ERROR " + record["error"].splitlines()[0][:160]
    keys = ("median_us", "gbps", "fraction_of_copy_bandwidth", "peak_gib", "planned_peak_gib", "planner_error",
            "step_ms", "tokens_per_s", "passed", "failed")
    parts = [f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
             for k in keys if k in record]
    return " ".join(parts) or "done"


# ---------------------------------------------------------------------------------------------------------
# Child: one step in this process.


def run_child(spec: dict) -> int:
    """Run the step described by ``spec`` (from the parent) and write its JSON; the process exit code."""
    step = Step(**spec["step"])
    signal.signal(signal.SIGTERM, _raise_interrupted)
    _start_watchdog(spec["hard_deadline"])
    header = {}
    ctx = StepContext(step, spec["out"], spec["deadline"])
    try:
        from bench_utils import device_info

        header = device_info()
        header.update(extra_versions())
        ctx.header = header
        ctx.save("running")
        resolve(step.fn)(ctx, **step.config)
        ctx.save("ok" if ctx.status == "running" else ctx.status)
        return 0
    except Interrupted as why:
        ctx.info["interrupted"] = str(why)
        ctx.save("timeout")
        return 124
    except Exception as error:
        ctx.info["error"] = f"{type(error).__name__}: {error}"[:2000]
        ctx.info["traceback"] = traceback.format_exc()[-4000:]
        ctx.save("error")
        print(ctx.info["traceback"], file=sys.stderr, flush=True)
        return 1


def _start_watchdog(hard_deadline: float) -> None:
    """End this process at ``hard_deadline`` even if the parent is gone and the main thread is stuck in C code.

    The parent kills an overrunning step itself; this covers a parent that was killed first (the step runs in
    its own process group, which nobody else would end).
    """
    def watch():
        time.sleep(max(hard_deadline - time.time(), 0) + KILL_GRACE_S)
        os._exit(137)

    threading.Thread(target=watch, daemon=True, name="gpu_check-watchdog").start()


def extra_versions() -> dict:
    """Versions beside ``bench_utils.device_info``'s: peft, accelerate, numpy, Python."""
    import importlib.metadata
    import platform

    found = {"python_version": platform.python_version()}
    for name in ("peft", "accelerate", "numpy"):
        try:
            found[f"{name}_version"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[f"{name}_version"] = None
    return found


# ---------------------------------------------------------------------------------------------------------
# Parent: run the steps one by one.


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, REPO, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group, then SIGKILL it if it has not ended after the grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _header_from(out_dir: str) -> dict:
    """Device and versions for a file the parent writes itself: copied from env.json, or else from any step
    file that has them (``--only`` may have left env out)."""
    found = (read_json(os.path.join(out_dir, name)) for name in [STEPS[0].file, *sorted(os.listdir(out_dir))]
             if name.endswith(".json") and name != SUMMARY_FILE)
    env = next((data for data in found if data and data.get("device")), {})
    keys = [k for k in env if k.endswith("_version") or k in ("device", "cuda")]
    header = {k: env[k] for k in keys}
    header["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return header


def _finish_record(step: Step, out_dir: str, status: str, started: float, note: str, allotted: float) -> dict:
    """Complete the step's JSON after its process ended badly (or never started), keeping what it wrote."""
    path = os.path.join(out_dir, step.file)
    payload = read_json(path) or {**_header_from(out_dir), "step": step.name, "about": step.about,
                                  "config": step.config, "budget_s": step.budget_s, "info": {}, "cases": []}
    payload["status"] = status
    payload.setdefault("info", {})["runner"] = note
    payload["elapsed_s"] = round(time.time() - started, 2)
    payload["allotted_s"] = round(allotted, 2)
    write_json(path, payload)
    return payload


def run_step(step: Step, out_dir: str, deadline: float) -> dict:
    """Run ``step`` in a child process until it ends or ``deadline`` (epoch seconds) passes; its JSON payload."""
    started = time.time()
    allotted = min(step.budget_s, deadline - started)
    if allotted < MIN_STEP_S:
        return _finish_record(step, out_dir, "skipped", started, f"not started: {max(allotted, 0):.0f} s left "
                              f"of the global budget, {MIN_STEP_S:.0f} s needed", allotted)
    # The child stops itself between sub-cases a little before the hard limit at which it is killed.
    margin = max(2.0, 0.05 * allotted)
    spec = {"step": dataclasses.asdict(step), "out": out_dir, "deadline": started + allotted - margin,
            "hard_deadline": started + allotted + KILL_GRACE_S}
    print(f"== step {step.name} (budget {step.budget_s:.0f} s, allotted {allotted:.0f} s): {step.about}", flush=True)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                            cwd=REPO, env=_child_env(), preexec_fn=os.setpgrp)
    try:
        rc = proc.wait(timeout=allotted)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return _finish_record(step, out_dir, "timeout", started,
                              f"killed after {allotted:.0f} s (the sub-case then running is lost)", allotted)
    except Interrupted:
        _kill_group(proc)
        _finish_record(step, out_dir, "interrupted", started, "the check was interrupted", allotted)
        raise
    payload = read_json(os.path.join(out_dir, step.file))
    if rc == 0 and payload is not None:
        payload["allotted_s"] = round(allotted, 2)
        write_json(os.path.join(out_dir, step.file), payload)
        return payload
    status = payload.get("status") if payload and payload.get("status") not in (None, "running") else "crashed"
    return _finish_record(step, out_dir, status, started, f"step process exit code {rc}", allotted)


def run_all(steps: list[Step], out_dir: str, total_s: float = TOTAL_S) -> dict:
    """Run ``steps`` in order within ``total_s`` seconds; write and return the summary."""
    names = [s.file for s in steps] + [SUMMARY_FILE]
    check_file_names(names)
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    deadline = start + total_s
    payloads: dict[str, dict] = {}
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index, step in enumerate(steps):
            try:
                payloads[step.name] = run_step(step, out_dir, deadline)
            except Interrupted:
                for later in steps[index + 1:]:
                    payloads[later.name] = _finish_record(later, out_dir, "skipped", time.time(),
                                                          "not started: the check was interrupted", 0)
                payloads[step.name] = read_json(os.path.join(out_dir, step.file)) or {}
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for leftover in os.listdir(out_dir):  # temporary files of a write that was killed half-way
            if leftover.endswith(".tmp"):
                os.remove(os.path.join(out_dir, leftover))
    summary = {**_header_from(out_dir), "total_s": round(time.time() - start, 1), "total_budget_s": total_s,
               "steps": {name: {"status": p.get("status"), "elapsed_s": p.get("elapsed_s")}
                         for name, p in payloads.items()}}
    try:
        from gpu_steps import summarize_goals

        summary["goals"] = summarize_goals(payloads)
    except Exception as error:
        summary["goals_error"] = f"{type(error).__name__}: {error}"
    write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    print(f"\n== gpu_check: {summary.get('device')} in {summary['total_s']:.0f} s")
    for name, step in summary["steps"].items():
        print(f"  {name:<12}{step['status'] or '?':<22}{step['elapsed_s'] or 0:>7.1f} s")
    for goal in summary.get("goals", []):
        met = {True: "met", False: "MISSED", None: "n/a"}[goal.get("met")]
        measured = goal.get("measured")
        value = f"{measured:.4g}" if isinstance(measured, float) else str(measured)
        print(f"  {met:<7}{goal['goal']:<60}{value}")


def check_file_names(names: list[str]) -> None:
    """The device tool brings back at most 8 files whose names use letters, digits, '.', '_' and '-' only."""
    bad = [n for n in names if not SAFE_NAME.match(n)]
    if bad:
        raise ValueError(f"output file names must use letters, digits, '.', '_' and '-' only: {bad}")
    if len(set(names)) != len(names) or len(names) + 1 > MAX_FILES:  # +1: the log the command line tees
        raise ValueError(f"{len(names)} output files (+ the log) exceed {MAX_FILES} or repeat: {names}")


def dry_run(steps: list[Step], total_s: float) -> int:
    """Print every step with its function, configuration and time budget; 1 if a function is missing."""
    missing = 0
    print(f"gpu_check: {len(steps)} steps, global budget {total_s:.0f} s, output files: "
          f"{', '.join(s.file for s in steps)}, {SUMMARY_FILE}")
    for number, step in enumerate(steps, 1):
        try:
            resolve(step.fn)
            found = "found"
        except (ImportError, AttributeError) as error:
            found, missing = f"MISSING ({error})", missing + 1
        print(f"{number}. {step.name}: budget {step.budget_s:.0f} s, file {step.file}, function {step.fn} [{found}]")
        print(f"   {step.about}")
        print(f"   config {json.dumps(step.config, sort_keys=True)}")
    print(f"sum of step budgets {sum(s.budget_s for s in steps):.0f} s (each step is also capped by what is left "
          f"of the global {total_s:.0f} s)")
    check_file_names([s.file for s in steps] + [SUMMARY_FILE])
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the JSON files (created)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    parser.add_argument("--total-s", type=float, default=TOTAL_S, help="global time budget in seconds")
    parser.add_argument("--only", help="comma-separated step names to run (default: all, in order)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: a JSON step spec from the parent
    args = parser.parse_args(argv)
    for path in (HERE, REPO):
        if path not in sys.path:
            sys.path.insert(0, path)
    if args.child:
        code = run_child(json.loads(args.child))
        # Skip interpreter teardown: compile worker pools and CUDA libraries can hang at exit, and the
        # step's JSON is already written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    steps = STEPS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in STEPS})
        if unknown:
            parser.error(f"unknown steps {unknown}; choose from {[s.name for s in STEPS]}")
        steps = [s for s in STEPS if s.name in wanted]
    if args.dry_run:
        return dry_run(steps, args.total_s)
    if not args.out:
        parser.error("--out DIR is required (or --dry-run)")
    summary = run_all(steps, os.path.abspath(args.out), args.total_s)
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

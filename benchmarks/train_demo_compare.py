"""The main job's demo, LAET against training the last blocks at the same k, over seeds.

For each seed, ``laet-fast train`` runs on its defaults (SmolLM2-135M-Instruct, a seeded subset of
Rotten Tomatoes fresh/rotten, the seed also drawing the subset and the held-out split) with
``--method laet``, then with ``--method last --k K`` where K is the number of blocks LAET trained
in that seed. Each run is its own process (the CPU peak memory is the process's peak RSS) with one
thread. Rows: accuracy and macro-F1 on the held-out split, trainable parameters, peak memory and the
planner's prediction, seconds per optimizer step, the lowest trained block (where the backward pass
stops), each as mean +- std over the seeds, plus every run.

Writes ``benchmarks/results/train_demo_compare.{json,md}`` (the committed one was run on the earlier demo of 400
sentences; the demo now takes 2,500, about 4 to 7 min a run). Run (CPU):

    nohup python benchmarks/train_demo_compare.py --seeds 0,1,2 > /tmp/train_demo_compare.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_utils import RESULTS_DIR, write_result  # noqa: E402

ROWS = (  # (key, label, format)
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro_f1", "macro-F1", "{:.4f}"),
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("peak_memory_gib", "peak memory (GiB, peak RSS)", "{:.3f}"),
    ("planned_memory_gib", "planner (GiB)", "{:.3f}"),
    ("time_per_step", "s/step", "{:.3f}"),
    ("lowest_block", "lowest trained block", "{:.1f}"),
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_demo(out: str, seed: int, method: str, k: int | None, threads: int) -> dict:
    """One `laet-fast train` run on the demo defaults in its own process; its report.json, condensed."""
    command = [sys.executable, "-m", "laet_fast", "train", "--method", method, "--seed", str(seed), "--out", out,
               "--no-progress"] + ([] if k is None else ["--k", str(k)])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    begin = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    return {
        "seed": seed, "method": method, "k": len(report["selection"]), "selection": report["selection"],
        "head_layers": report["head_layers"], "accuracy": report["metrics"]["accuracy"],
        "macro_f1": report["metrics"]["macro_f1"], "eval_loss": report["metrics"]["loss"],
        "trainable_params": report["trainable_params"], "total_params": report["total_params"],
        "peak_memory_gib": report["peak_memory"] / 2**30,
        "planned_memory_gib": None if report["planned_memory"] is None else report["planned_memory"] / 2**30,
        "time_per_step": report["time_per_step"], "steps": report["steps"], "scoring_time": report["scoring_time"],
        "training_time": report["training_time"], "lowest_block": min(report["selection"]),
        "blocks_run": report["forward"]["blocks_run"], "forward_saved_share": report["forward"]["saved_share"],
        "wall_s": wall, "command": "laet-fast " + " ".join(command[3:command.index("--out")]),
    }


def summary(runs: list[dict]) -> dict:
    """key -> {mean, std} over the runs (std 0 for one run)."""
    out = {}
    for key, _, _ in ROWS:
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def markdown(result: dict) -> str:
    methods = list(result["summary"])
    seeds = ",".join(map(str, result["seeds"]))
    lines = [
        "# The demo: LAET against the last blocks at the same k",
        "",
        f"`laet-fast train` on its defaults (SmolLM2-135M-Instruct, {result['demo_subset']} Rotten Tomatoes sentences, "
        f"fresh/rotten, 20% held out), seeds {seeds}, one thread per run, {result['device']}. "
        "`last` trains the last K blocks, K being the number LAET trained in the same seed. Mean +- std over seeds.",
        "",
        "| | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for key, label, fmt in ROWS:
        cells = []
        for method in methods:
            stat = result["summary"][method].get(key)
            cells.append("n/a" if stat is None else f"{fmt.format(stat['mean'])} +- {fmt.format(stat['std'])}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | method | blocks | accuracy | macro-F1 | s/step | peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['seed']} | {r['method']} | {r['selection']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['time_per_step']:.3f} | {r['peak_memory_gib']:.3f} |")
    lines += ["", "Peak memory on CPU is the process's peak RSS (model loading included); the planner counts training "
              "tensors only and assumes a full forward pass.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="train_demo_compare", help="results file stem")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    from laet_fast.commands.train import DEMO_SUBSET

    runs = []
    with tempfile.TemporaryDirectory(prefix="train_demo_compare-") as tmp:
        for seed in seeds:
            laet = run_demo(os.path.join(tmp, f"laet-{seed}"), seed, "laet", None, args.threads)
            log(f"seed {seed} laet: blocks {laet['selection']}, accuracy {laet['accuracy']:.4f}, "
                f"{laet['time_per_step']:.3f} s/step")
            last = run_demo(os.path.join(tmp, f"last-{seed}"), seed, "last", laet["k"], args.threads)
            log(f"seed {seed} last: blocks {last['selection']}, accuracy {last['accuracy']:.4f}, "
                f"{last['time_per_step']:.3f} s/step")
            runs += [laet, last]
    result = {
        "seeds": seeds, "threads": args.threads, "demo_subset": DEMO_SUBSET, "runs": runs,
        "summary": {m: summary([r for r in runs if r["method"] == m]) for m in ("laet", "last")},
        "reproduce": f"python benchmarks/train_demo_compare.py --seeds {args.seeds} --threads {args.threads}",
    }
    path = write_result(args.name, result)
    with open(path) as handle:
        result = json.load(handle)
    with open(os.path.join(RESULTS_DIR, f"{args.name}.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(result))
    log(f"wrote {path} and {args.name}.md")


if __name__ == "__main__":
    main()

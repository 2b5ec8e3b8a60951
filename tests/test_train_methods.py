"""laet_fast.methods: every method scores (or not) and chooses the blocks it documents."""
import math

import pytest
import torch

from tiny_models import random_batch, tiny_model
from laet_fast.scores import LayerScores
from laet_fast.methods import METHODS, choose_layers, parse_method, probe_spread, score_layers


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


def batches(model, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for side in ("right", "left")[:n]:
        ids, mask = random_batch(model.config.vocab_size, batch=3, seq=9, generator=gen, side=side)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_parse_method():
    assert parse_method("LAET") == "laet"
    assert parse_method("3, 1") == (3, 1)
    assert parse_method([0, 2]) == (0, 2)
    with pytest.raises(ValueError, match="choose one of laet"):
        parse_method("best")


@pytest.mark.parametrize("method", ["grad_norm", "block_influence", "relative_change"])
def test_scored_methods_score_every_block_and_leave_the_model_as_it_was(method):
    model = tiny_model("llama", seed=1, num_hidden_layers=5)
    model.model.layers[4].requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = score_layers(model, batches(model), method)
    assert isinstance(scores, LayerScores) and scores.num_layers == 5
    assert all(math.isfinite(v) for v in scores[method])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    chosen = choose_layers(scores, method, k=2, num_layers=5)
    ranked = sorted(range(5), key=lambda i: scores[method][i], reverse=True)[:2]
    assert list(chosen.layers) == sorted(ranked) and chosen.metric == method


def test_score_free_methods():
    model = tiny_model("llama", seed=1)
    for method in ("last", "random", "all", "0,2"):
        assert score_layers(model, batches(model), method) is None
    assert choose_layers(None, "last", k=2, num_layers=6).layers == (4, 5)
    assert choose_layers(None, "random", k=3, num_layers=6, seed=4).layers == \
        choose_layers(None, "random", k=3, num_layers=6, seed=4).layers
    assert choose_layers(None, "all", num_layers=4).layers == (0, 1, 2, 3)
    assert choose_layers(None, [3, 1], num_layers=4).layers == (1, 3)


def test_grad_norm_without_k_is_the_variance_split():
    scores = {"grad_norm": [1.0, 1.1, 0.9, 5.0, 5.2, 4.9, 1.0, 5.1]}
    chosen = choose_layers(scores, "grad_norm", num_layers=8)
    assert chosen.layers == (3, 4, 5, 7) and chosen.strategy == "variance_split"


def test_refusals():
    with pytest.raises(ValueError, match="needs k"):
        choose_layers({"block_influence": [1.0, 2.0]}, "block_influence", num_layers=2)
    with pytest.raises(ValueError, match="run score_layers first"):
        choose_layers(None, "grad_norm", num_layers=2)
    with pytest.raises(ValueError, match="out of range"):
        choose_layers(None, [5], num_layers=3)
    model = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="no batches"):
        score_layers(model, [], "block_influence")


def test_methods_listed():
    assert set(METHODS) == {"laet", "laet-cost", "grad_norm", "block_influence", "relative_change", "last", "random",
                            "all"}


NAMES = [f"layer.{i}" for i in range(4)]


def test_probe_spread_is_too_wide_when_a_blocks_uncertainty_reaches_laets_gap():
    mean = [0.6, 0.7, 0.8, 0.9]
    gap = 0.5 * math.sqrt(sum((m - 0.75) ** 2 for m in mean) / 4)  # margin x population sd of the means: 0.0559
    for std, too_wide in ((0.10, False), (0.12, True)):  # uncertainty std / sqrt(4 folds): 0.05, then 0.06
        scores = LayerScores({"probe_acc": mean, "probe_acc_std": [std, std / 2, std, 3 * std]}, NAMES,
                             metadata={"folds": 4, "examples": 80})
        spread = probe_spread(scores)
        assert spread["uncertainty"] == pytest.approx(std / 2) and spread["gap"] == pytest.approx(gap)
        assert spread["too_wide"] is too_wide and spread["examples"] == 80 and spread["mean"] == mean
    assert probe_spread(LayerScores({"probe_acc": mean}, NAMES, metadata={"val_fraction": 0.2})) is None


def test_laet_probes_are_cross_validated_on_the_first_probe_examples():
    from laet_fast.embed import layer_embeddings, probe_layers

    model = tiny_model("llama", seed=1, num_hidden_layers=3)
    data = batches(model) + batches(model, seed=1)  # 4 batches of 3 rows
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0])
    scores = score_layers(model, data, "laet", labels=labels, probe_examples=10, epochs=3)
    # Independent: the first 10 rows' features, 4 folds (the smaller class of those rows has 4 examples).
    want = probe_layers(layer_embeddings(model, data, progress=False)[:10], labels[:10], folds=4, epochs=3)
    assert scores.metadata["examples"] == 10 and scores.metadata["folds"] == 4
    assert scores["probe_acc"] == want["probe_acc"] and scores["probe_acc_std"] == want["probe_acc_std"]
    assert scores["probe_loss"] == pytest.approx(want["probe_loss"], rel=1e-5)
    chosen = choose_layers(scores, "laet-cost", num_layers=3, cost_model=_cost_model(model))
    assert chosen.strategy == "laet_cost" and set(chosen.layers) <= set(chosen.params["kept"])
    assert chosen.lowest == max(chosen.params["kept"], key=lambda i: scores["probe_acc"][i])
    assert choose_layers(scores, "laet-cost", k=1, num_layers=3, cost_model=_cost_model(model)).layers == \
        (chosen.lowest,)


def _cost_model(model):
    from laet_fast.cost import CostModel

    return CostModel(model.config, seq_len=9, batch_size=3, dtype="fp32")

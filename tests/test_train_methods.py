"""laet_fast.train.methods: every method scores (or not) and chooses the blocks it documents."""
import math

import pytest
import torch

from tiny_models import random_batch, tiny_model
from laet_fast.scores import LayerScores
from laet_fast.train.methods import METHODS, choose_layers, parse_method, score_layers


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
    assert set(METHODS) == {"laet", "grad_norm", "block_influence", "relative_change", "last", "random", "all"}

"""FusionClassifier: auto layer choice, cross-model fusion, refused mismatches, save/load."""
import os

import pytest
import torch

from merge_models import random_texts
from tiny_models import one_thread  # noqa: F401 (a fixture)

from laet_fast.embed import FUSIONS, FusionClassifier, LayerEmbeddings, fingerprint_texts


pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = dict(epochs=15, hidden=32, proj_dim=16, batch_size=32, lr=1e-2, seed=0)


def two_models(n=400, seed=0):
    """Two "models" over the same texts: the label is the sign of A's layer 1 plus B's layer 0 (feature 0 each),
    so each model alone sees half of the signal and the fusion of both sees all of it."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, 10, generator=gen)
    b = torch.randn(n, 2, 7, generator=gen) * 3 + 2
    y = ((a[:, 1, 0] + (b[:, 0, 0] - 2) / 3) > 0).long()
    texts = random_texts(n, seed=seed)

    def wrap(data, name):
        return LayerEmbeddings(data, fingerprint=fingerprint_texts(texts), layers=range(data.shape[1]),
                               names=[f"{name}.{i}" for i in range(data.shape[1])], pooling="mean")

    return wrap(a, "a"), wrap(b, "b"), y, texts


def split(emb, rows):
    return emb.subset(rows)


def test_auto_picks_the_signal_layers_and_cross_model_fusion_beats_each_model():
    a, b, y, _ = two_models()
    train, test = list(range(0, 320)), list(range(320, 400))
    labels = ["pos" if v else "neg" for v in y.tolist()]
    fused = FusionClassifier("auto", **SETTINGS).fit([split(a, train), split(b, train)], [labels[i] for i in train])
    top_two = {(c["model"], c["layer"]) for c in fused.search_["candidates"][:2]}
    assert top_two == {(0, 1), (1, 0)} <= set(fused.layers_) and len(fused.search_["candidates"]) == 5
    assert len(fused.layers_) == fused.search_["k"] and fused.search_["val_acc_by_k"]["2"] > 0.8
    both = fused.score([split(a, test), split(b, test)], [labels[i] for i in test])
    alone = FusionClassifier([(0, 1)], **SETTINGS).fit(a[train], y[train]).score(a[test], y[test])
    assert both > alone + 0.1 and both > 0.85
    assert fused.predict([split(a, test), split(b, test)])[:3] == [fused.classes_[i] for i in
                                                                     fused.predict_proba([split(a, test),
                                                                                          split(b, test)])[:3]
                                                                     .argmax(1).tolist()]


def test_auto_tries_every_k_up_to_k_max_and_takes_the_largest_when_it_is_best():
    # The label is the sign of the sum of layers 0, 1 and 2 (feature 0 each): each layer alone sees a third of
    # the signal, two see two thirds, only all three see it whole. Layer 3 is noise, so k_max = 3 < 4 layers.
    gen = torch.Generator().manual_seed(5)
    emb = torch.randn(400, 4, 6, generator=gen)
    y = (emb[:, :3, 0].sum(1) > 0).long()
    fused = FusionClassifier("auto", **{**SETTINGS, "k_max": 3}).fit(emb, y)
    by_k = fused.search_["val_acc_by_k"]
    assert list(by_k) == ["1", "2", "3"]
    assert by_k["3"] > by_k["2"] + 0.05 and by_k["3"] > 0.9
    assert fused.search_["k"] == 3 and sorted(fused.layers_) == [(0, 0), (0, 1), (0, 2)]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_learns_the_cross_model_signal(fusion):
    a, b, y, _ = two_models(seed=1)
    train, test = list(range(0, 320)), list(range(320, 400))
    model = FusionClassifier([(0, 1), (1, 0)], fusion, **SETTINGS).fit([split(a, train), split(b, train)], y[train])
    proba = model.predict_proba([split(a, test), split(b, test)])
    assert proba.shape == (80, 2) and torch.allclose(proba.sum(1), torch.ones(80))
    assert model.score([split(a, test), split(b, test)], y[test]) > 0.8


def test_examples_in_another_order_or_count_are_refused():
    a, b, y, texts = two_models(n=40)
    shuffled = a[torch.randperm(40)]  # a plain tensor now: it lost the fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        FusionClassifier([(0, 0), (1, 0)]).fit([shuffled, b], y)
    other = LayerEmbeddings(torch.as_tensor(a), fingerprint=fingerprint_texts(texts[::-1]), layers=a.layers,
                            names=a.names, pooling="mean")
    with pytest.raises(ValueError, match="different texts or a different order"):
        FusionClassifier([(0, 0), (1, 0)]).fit([other, b], y)
    with pytest.raises(ValueError, match="different numbers of examples"):
        FusionClassifier([(0, 0), (1, 0)]).fit([a, split(b, list(range(30)))], y)
    with pytest.raises(ValueError, match="different texts or a different order"):
        FusionClassifier([(0, 0), (1, 0)]).fit([a.subset(range(20)), b.subset(range(20, 40))], y[:20])
    assert a.subset([3, 1]).fingerprint == b.subset([3, 1]).fingerprint != a.subset([1, 3]).fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        FusionClassifier([(0, 0), (1, 0)]).fit([a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)], y)


def test_save_and_load_round_trip(tmp_path):
    a, b, y, _ = two_models(n=120)
    labels = ["yes" if v else "no" for v in y.tolist()]
    model = FusionClassifier("auto", "gated", **{**SETTINGS, "epochs": 3, "k_max": 2}).fit([a, b], labels)
    model.save(str(tmp_path / "fusion"))
    assert sorted(os.listdir(tmp_path / "fusion")) == ["fusion.json", "fusion.safetensors"]
    loaded = FusionClassifier.load(str(tmp_path / "fusion"))
    assert loaded.layers_ == model.layers_ and loaded.classes_ == ["no", "yes"]
    torch.testing.assert_close(loaded.predict_proba([a, b]), model.predict_proba([a, b]))
    with pytest.raises(ValueError, match="holds no saved FusionClassifier"):
        FusionClassifier.load(str(tmp_path))


def test_bad_input():
    a, b, y, _ = two_models(n=40)
    with pytest.raises(ValueError, match="unknown fusion 'sum'"):
        FusionClassifier("auto", "sum")
    with pytest.raises(ValueError, match="out of range"):
        FusionClassifier([(0, 5)]).fit(a, y)
    with pytest.raises(ValueError, match="not fitted"):
        FusionClassifier().predict(a)
    model = FusionClassifier([(0, 0)], epochs=1).fit(a, y)
    with pytest.raises(ValueError, match=r"\(layers, hidden\)"):
        model.predict(b)
    with pytest.raises(ValueError, match="not seen in fit"):
        model.score(a, [7] * 40)
    with pytest.raises(ValueError, match="at least two classes"):
        FusionClassifier([(0, 0)]).fit(a, [1] * 40)
    with pytest.raises(ValueError, match="no embeddings"):
        FusionClassifier().fit([], y)

"""Batched layer probes: equal to probes trained one by one, no leakage, planted layer, LAET's rule, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from tiny_models import one_thread  # noqa: F401 (a fixture)

from laet_fast import select_layers
from laet_fast.data import stratified_folds, stratified_split
from laet_fast.embed import BatchedProbe, ProbeConfig, probe_layers
from laet_fast.selection import laet_keep


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n=300, layers=5, hidden=12, signal_layer=None, seed=0, classes=2):
    """Random features where only ``signal_layer`` (default: the last) carries the label (a shift of its first
    features)."""
    signal_layer = layers - 1 if signal_layer is None else signal_layer
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layers, hidden, generator=gen) * 2 + 1
    y = torch.randint(0, classes, (n,), generator=gen)
    x[:, signal_layer, :classes] += 6.0 * F.one_hot(y, classes)
    return x, y


def train_alone(init_linears, x, y, mean, std, config, order_generator):
    """One probe, trained by a plain loop: own nn.Linear stack, own Adam, the batched run's minibatches."""
    linears = [torch.nn.Linear(init.in_features, init.out_features) for init in init_linears]
    for mine, theirs in zip(linears, init_linears):
        mine.load_state_dict(theirs.state_dict())
    params = [p for linear in linears for p in linear.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)

    def forward(features):
        z = (features.double() - mean) / std
        z = z.float()
        for k, linear in enumerate(linears):
            z = linear(z)
            z = torch.relu(z) if k < len(linears) - 1 else z
        return z

    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=order_generator)
        for start in range(0, len(x), config.batch_size):
            rows = order[start:start + config.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(forward(x[rows]), y[rows]).backward()
            optimizer.step()
    return forward


@pytest.mark.parametrize("probe, hidden", [("mlp", (9, 7)), ("linear", ())])
def test_batched_probes_equal_probes_trained_one_by_one(probe, hidden):
    x, y = planted(n=97, layers=4, hidden=11, classes=3, seed=4)
    config = ProbeConfig(probe=probe, hidden=hidden or (1,), epochs=6, lr=3e-3, batch_size=16, seed=7)
    initial = BatchedProbe(4, 11, 3, config)
    batched = BatchedProbe(4, 11, 3, config).fit(x, y)
    mean = x.double().mean(0)
    std = x.double().std(0, unbiased=False)
    torch.testing.assert_close(batched.mean.double(), mean, rtol=1e-6, atol=1e-6)
    logits = batched(x)
    for i in range(4):
        init = [m for m in initial.head(i).mlp if isinstance(m, torch.nn.Linear)]
        alone = train_alone(init, x[:, i], y, mean[i], std[i], config, torch.Generator().manual_seed(config.seed))
        with torch.no_grad():
            torch.testing.assert_close(logits[:, i], alone(x[:, i]), rtol=2e-4, atol=2e-4)


def test_probe_i_does_not_depend_on_how_many_layers_are_probed():
    x, y = planted(n=80, layers=3, hidden=6)
    config = ProbeConfig(epochs=3, hidden=(5,))
    three = BatchedProbe(3, 6, 2, config).fit(x, y)
    one = BatchedProbe(1, 6, 2, config).fit(x[:, :1], y)
    torch.testing.assert_close(three(x)[:, 0], one(x[:, :1])[:, 0], rtol=1e-5, atol=1e-5)


def test_head_is_a_standalone_trainable_copy():
    x, y = planted(n=60, layers=3, hidden=6)
    probe = BatchedProbe(3, 6, 2, ProbeConfig(epochs=2)).fit(x, y)
    head = probe.head(2)
    with torch.no_grad():
        torch.testing.assert_close(head(x[:, 2]), probe(x)[:, 2], rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in head.parameters())
    before = probe(x).detach().clone()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    torch.testing.assert_close(probe(x).detach(), before)
    with pytest.raises(ValueError, match="out of range"):
        probe.head(3)


def test_standardization_uses_the_training_part_only():
    x, y = planted(n=200, layers=3, hidden=8)
    scores, probe = probe_layers(x, y, epochs=3, seed=1, return_probes=True)
    train, val = stratified_split(y, 0.2, seed=1)
    torch.testing.assert_close(probe.mean, x[train].mean(0), rtol=1e-5, atol=1e-5)
    changed = x.clone()
    changed[val] = changed[val] * 100 + 50  # validation features only: training must not see them
    _, other = probe_layers(changed, y, epochs=3, seed=1, return_probes=True)
    for a, b in zip(probe.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_planted_layer_is_found_and_laet_keeps_only_it():
    x, y = planted(n=400, layers=6, hidden=16, signal_layer=3)
    scores = probe_layers(x, y, epochs=10, seed=0)
    acc = scores["probe_acc"]
    assert max(range(6), key=acc.__getitem__) == 3 and acc[3] > 0.9
    assert all(a < 0.7 for i, a in enumerate(acc) if i != 3)
    assert all(0 <= f <= 1 for f in scores["probe_f1"]) and all(loss > 0 for loss in scores["probe_loss"])
    selection = select_layers(scores, strategy="laet", margin=0.5)
    assert selection.layers == (3,) and selection.strategy == "laet" and selection.params == {"margin": 0.5}


def test_folds_give_means_and_stds():
    x, y = planted(n=150, layers=2, hidden=5)
    scores = probe_layers(x, y, folds=3, probe="linear", epochs=4)
    assert {"probe_acc", "probe_acc_std", "probe_f1_std", "probe_loss_std"} <= set(scores)
    assert all(s >= 0 for s in scores["probe_acc_std"]) and scores.metadata["folds"] == 3


def test_stratified_split_and_folds():
    y = torch.tensor([0] * 50 + [1] * 20 + [2] * 5)
    train, val = stratified_split(y, 0.2, seed=3)
    assert sorted(train + val) == list(range(75))
    assert [int((y[val] == c).sum()) for c in range(3)] == [10, 4, 1]
    again = stratified_split(y, 0.2, seed=3)
    assert again[1] == val and stratified_split(y, 0.2, seed=4)[1] != val
    folds = stratified_folds(y, 5, seed=0)
    assert sorted(i for _, v in folds for i in v) == list(range(75))  # each example validated exactly once
    for train, val in folds:
        assert set(train).isdisjoint(val)
        assert int((y[val] == 0).sum()) == 10 and int((y[val] == 1).sum()) == 4


def test_weighted_f1_against_a_hand_count():
    # Labels 0,0,0,1,1,2 predicted 0,0,1,1,2,2. Class 0: tp 2, fp 0, fn 1 -> F1 4/5; class 1: tp 1, fp 1, fn 1
    # -> 1/2; class 2: tp 1, fp 1, fn 0 -> 2/3. Weighted by support 3, 2, 1: (3*0.8 + 2*0.5 + 2/3) / 6.
    from laet_fast.embed.probes import weighted_f1

    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2])[:, None]
    assert math.isclose(float(weighted_f1(predicted, labels, 3)[0]), (2.4 + 1.0 + 2 / 3) / 6, rel_tol=1e-12)


def test_laet_rule_on_a_hand_made_table():
    # sd(acc) = 0.08476, sd(f1) = 0.07985 (population); margin 0.5 -> gaps 0.0424 and 0.0399.
    # Layer 0 and layer 3 are beaten on both by layer 1 (by >= 0.10 each). Layer 2 has the best accuracy
    # and a poor F1, layers 1 and 4 are within the gaps of each other: those three stay.
    acc = [0.60, 0.80, 0.82, 0.70, 0.81]
    f1 = [0.58, 0.79, 0.70, 0.69, 0.80]
    assert laet_keep(acc, f1, margin=0.5) == [1, 2, 4]
    # margin 0 is Pareto dominance: layer 4 beats layer 1 on both.
    assert laet_keep(acc, f1, margin=0.0) == [2, 4]
    # margin 3: gaps 0.254 and 0.240; no difference is that large, every layer stays.
    assert laet_keep(acc, f1, margin=3.0) == [0, 1, 2, 3, 4]
    assert laet_keep([0.5] * 4, [0.4] * 4) == [0, 1, 2, 3]  # all tied: all kept
    assert laet_keep([0.6, float("nan"), 0.9], [0.6, 0.9, float("nan")]) == [0]  # non-finite: never kept
    selection = select_layers({"probe_acc": acc, "probe_f1": f1}, strategy="laet")
    assert selection.layers == (1, 2, 4) and selection.num_layers == 5


def test_laet_strategy_bad_input():
    with pytest.raises(ValueError, match="probe_acc' and 'probe_f1"):
        select_layers({"grad_norm": [1.0, 2.0]}, strategy="laet")
    with pytest.raises(ValueError, match="k=3 is not used"):
        select_layers({"probe_acc": [1.0], "probe_f1": [1.0]}, strategy="laet", k=3)
    with pytest.raises(ValueError, match="margin"):
        select_layers({"probe_acc": [1.0], "probe_f1": [1.0]}, strategy="laet", margin=-1)


def test_probe_layers_bad_input():
    x, y = planted(n=40, layers=2, hidden=4)
    with pytest.raises(ValueError, match="empty"):
        probe_layers(torch.empty(0, 2, 4), [])
    with pytest.raises(ValueError, match="39 labels for 40 examples"):
        probe_layers(x, y[:39])
    with pytest.raises(ValueError, match="at least two classes"):
        probe_layers(x, torch.zeros(40, dtype=torch.long))
    bad = x.clone()
    bad[7, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*example 7, layer 1"):
        probe_layers(bad, y)
    with pytest.raises(ValueError, match="unknown probe 'svm'"):
        probe_layers(x, y, probe="svm")
    with pytest.raises(ValueError, match=r"\[N, L, H\]"):
        probe_layers(x[:, 0], y)
    with pytest.raises(ValueError, match="val_fraction"):
        probe_layers(x, y, val_fraction=1.5)
    with pytest.raises(ValueError, match="folds"):
        probe_layers(x, y, folds=1)


@pytest.mark.parametrize("on_boundary", ["probe_acc", "probe_f1"])
def test_laet_margin_boundary_is_exact(on_boundary):
    # Values whose gaps are exact in binary floating point: the boundary metric scores [0, 1, 0, 1], mean 0.5,
    # population sd exactly 0.5, so margin 2 makes its gap exactly 1.0, layer 1's lead over layer 0. The other
    # metric scores [0, 1, 0.5, 0.5] (sd 0.354, gap 0.707), clearly beaten by that same lead of 1.0 and not by
    # the 0.5 leads of layers 2 and 3.
    boundary, other = [0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.5, 0.5]
    acc, f1 = (boundary, other) if on_boundary == "probe_acc" else (other, boundary)
    # "Not beaten by more than margin x sd": a lead of exactly margin x sd beats, so layer 0 goes.
    assert laet_keep(acc, f1, margin=2.0) == [1, 2, 3]
    # The next float above margin 2 makes the gap 1.0 plus one ulp (x 0.5 is exact): layer 0 stays.
    assert laet_keep(acc, f1, margin=math.nextafter(2.0, math.inf)) == [0, 1, 2, 3]


def test_probe_training_shows_a_progress_bar_and_scores_the_same(capsys):
    x, y = planted(n=60, layers=3, hidden=4)
    quiet, quiet_probe = probe_layers(x, y, folds=3, epochs=2, return_probes=True)
    capsys.readouterr()
    shown, shown_probe = probe_layers(x, y, folds=3, epochs=2, return_probes=True, progress=True)
    bar = capsys.readouterr().err
    assert "training 3 probes" in bar and "8/8" in bar  # 3 folds and the refit, 2 epochs each
    assert shown["probe_acc"] == quiet["probe_acc"]
    for a, b in zip(quiet_probe.parameters(), shown_probe.parameters()):
        assert torch.equal(a, b)

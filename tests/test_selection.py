"""Selection and select_layers: IR-Tuning's variance split against a brute-force float64
reference, the k-based baselines, serialisation and the user-facing errors."""
import math
import random
import warnings

import numpy as np
import pytest

from laet_fast.scores import LayerScores
from laet_fast.selection import STRATEGIES, Selection, select_layers, variance_split


def brute_force_split(values, low, high):
    """Every integer split point allowed by the bounds, scored with numpy float64 population
    variances; returns (best split, best cost). Bounds written out with exact fractions."""
    n = len(values)
    v = np.sort(np.asarray(values, dtype=np.float64))
    best = None
    for s in range(1, n):
        # s / n in [low, high], compared exactly with rational arithmetic on integers
        if s * 10**6 < round(low * 10**6) * n or s * 10**6 > round(high * 10**6) * n:
            continue
        cost = np.var(v[:s]) + np.var(v[s:])
        if best is None or cost < best[1] - 1e-12 * max(1.0, abs(best[1])):
            best = (s, cost)
    return best


@pytest.mark.parametrize("n", [3, 4, 7, 16, 20, 31])
@pytest.mark.parametrize("low,high", [(0.35, 0.65), (0.2, 0.8), (0.0, 1.0), (0.5, 0.5)])
@pytest.mark.parametrize("seed", range(3))
def test_variance_split_matches_brute_force(n, low, high, seed):
    rng = np.random.default_rng(seed * 100 + n)
    # Two clusters plus noise, in random order, so the optimum is not always at a bound.
    values = np.concatenate([rng.normal(1.0, 0.3, n // 2), rng.normal(3.0, 0.5, n - n // 2)])
    rng.shuffle(values)
    expected = brute_force_split(values.tolist(), low, high)
    if expected is None:
        with pytest.raises(ValueError, match="no split point"):
            variance_split(sorted(values.tolist()), low, high)
        return
    split = variance_split(sorted(values.tolist()), low, high)
    sorted_values = np.sort(values)
    cost = np.var(sorted_values[:split]) + np.var(sorted_values[split:])
    assert cost == pytest.approx(expected[1], rel=1e-9, abs=1e-12)
    assert math.ceil(low * n - 1e-9) <= split <= math.floor(high * n + 1e-9)

    selection = select_layers({"grad_norm": values.tolist()}, low=low, high=high)
    order = np.argsort(values, kind="stable")
    assert set(selection.layers) == set(order[split:].tolist())  # the high group
    assert min(values[list(selection.layers)]) >= max(np.delete(values, list(selection.layers)))
    assert selection.params == {"low": low, "high": high, "split": split}


def test_variance_split_bound_is_exact_at_representable_edges():
    """0.35 * 20 is 7.000000000000001 in floating point; split 7 must stay allowed."""
    values = [0.0] * 7 + [10.0] * 13
    assert variance_split(values, 0.35, 0.65) == 7


def test_variance_split_finds_clear_gap():
    scores = [0.1, 5.0, 0.2, 5.2, 0.15, 4.9, 5.1, 0.12]
    selection = select_layers(scores, strategy="variance_split", low=0.25, high=0.75)
    assert selection.layers == (1, 3, 5, 6)


@pytest.mark.parametrize("strategy", ["top", "bottom"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_bottom(strategy, k):
    rng = random.Random(k)
    values = [rng.uniform(-2, 5) for _ in range(7)]
    selection = select_layers({"block_influence": values}, metric="block_influence", strategy=strategy, k=k)
    ranked = sorted(range(7), key=lambda i: values[i], reverse=strategy == "top")
    assert selection.layers == tuple(sorted(ranked[:k]))
    assert selection.metric == "block_influence" and selection.params == {"k": k}
    assert selection.scores == tuple(values)


def test_last_and_random():
    assert select_layers(None, strategy="last", k=3, num_layers=10).layers == (7, 8, 9)
    first = select_layers(None, strategy="random", k=4, num_layers=12, seed=5)
    again = select_layers(None, strategy="random", k=4, num_layers=12, seed=5)
    other = [select_layers(None, strategy="random", k=4, num_layers=12, seed=s).layers for s in range(6, 12)]
    assert first == again and len(first) == 4 and all(0 <= i < 12 for i in first)
    assert any(layers != first.layers for layers in other)
    assert first.params == {"k": 4, "seed": 5} and first.metric is None
    # Score-free strategies take the depth from the scores and ignore their values.
    assert select_layers({"act_rms": [1.0, math.nan, 2.0]}, strategy="last", k=1).layers == (2,)


def test_non_finite_scores_are_never_selected():
    values = [1.0, math.nan, 9.0, math.inf, 8.5, 0.5, -math.inf, 0.7]
    for strategy, kwargs in [("top", {"k": 3}), ("bottom", {"k": 3}), ("variance_split", {})]:
        selection = select_layers(values, strategy=strategy, **kwargs)
        assert not {1, 3, 6} & set(selection.layers), (strategy, selection)
    assert select_layers(values, strategy="top", k=2).layers == (2, 4)
    assert select_layers(values, strategy="variance_split").layers == (2, 4)
    with pytest.raises(ValueError, match=r"Only 5 of 8 layers have a finite .* \[1, 3, 6\]"):
        select_layers(values, strategy="top", k=6)


def test_layer_scores_input():
    scores = LayerScores({"grad_norm": [0.1, 0.2, 3.0, 2.9], "act_rms": [1, 2, 3, 4]},
                         [f"model.layers.{i}" for i in range(4)])
    selection = select_layers(scores, strategy="variance_split", low=0.25, high=0.75)
    assert selection.layers == (2, 3) and selection.metric == "grad_norm"
    assert select_layers(scores, metric="act_rms", strategy="bottom", k=1).layers == (0,)


def test_json_round_trip(tmp_path):
    selection = select_layers([0.3, math.nan, 2.0, 1.9, 0.1, math.inf], strategy="top", k=2)
    path = tmp_path / "selection.json"
    selection.to_json(str(path))
    loaded = Selection.from_json(str(path))
    assert loaded.to_dict() == selection.to_dict()
    assert loaded.layers == selection.layers and loaded.params == selection.params
    assert math.isnan(loaded.scores[1]) and loaded.scores[5] == math.inf
    assert '"inf"' in path.read_text() and "NaN" not in path.read_text()
    manual = Selection(layers=(5, 1), num_layers=8)
    assert Selection.from_dict(manual.to_dict()) == manual


def test_repr_is_readable():
    selection = select_layers([0.1, 0.2, 3.0, 2.9], low=0.25, high=0.75)
    text = repr(selection)
    assert text.startswith("Selection(layers=[2, 3] of 4, strategy='variance_split', metric='grad_norm'")
    assert "low=0.25" in text and "split=2" in text


def test_selection_container_behaviour():
    selection = Selection(layers=(4, 0, 2), num_layers=6)
    assert selection.layers == (0, 2, 4) and selection.lowest == 0 and len(selection) == 3
    assert 2 in selection and 3 not in selection and list(selection) == [0, 2, 4]
    assert Selection(layers=(), num_layers=3).lowest is None


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(strategy="top", k=5), ValueError, r"k=5 is out of range.*1 <= k <= 4"),
    (dict(strategy="top", k=0), ValueError, r"k=0 is out of range"),
    (dict(strategy="last", k=-1), ValueError, r"k=-1 is out of range"),
    (dict(strategy="top"), ValueError, r"needs k="),
    (dict(strategy="best"), ValueError, r"Unknown strategy 'best'.*variance_split"),
    (dict(metric="loss_drop"), ValueError, r"no metric 'loss_drop'.*grad_norm"),
    (dict(strategy="top", k=2.0), ValueError, r"k=2.0 must be an integer number of layers \(e.g. k=2\)"),
    (dict(strategy="last", k=True), ValueError, r"k=True must be an integer"),
    (dict(k=2), ValueError, r"k=2 is not used by strategy='variance_split'.*splits=2"),
    (dict(splits=0), ValueError, r"splits=0"),
    (dict(strategy="top", k=2, splits=2), ValueError, r"variance_split' only"),
    (dict(num_layers=5), ValueError, r"cover 4 layers but num_layers=5"),
    (dict(low=0.6, high=0.4), ValueError, r"low <= high"),
    (dict(low=0.3, high=0.32), ValueError, r"no split point"),
])
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        select_layers({"grad_norm": [0.1, 0.2, 0.3, 0.4]}, **kwargs)


def test_more_errors():
    with pytest.raises(ValueError, match="needs scores"):
        select_layers(None, strategy="top", k=1, num_layers=3)
    with pytest.raises(ValueError, match="needs num_layers"):
        select_layers(None, strategy="last", k=1)
    with pytest.raises(ValueError, match=r"out of range for a model with 4 layers"):
        Selection(layers=(1, 4), num_layers=4)
    with pytest.raises(ValueError, match=r"out of range"):
        Selection(layers=(-1,), num_layers=4)
    with pytest.raises(ValueError, match="repeated"):
        Selection(layers=(1, 1), num_layers=4)
    selection = Selection(layers=(1,), num_layers=4)
    selection.check_model(4)
    with pytest.raises(ValueError, match=r"made for a model with 4 layers, but the model has 6"):
        selection.check_model(6)


def test_strategies_listed():
    assert set(STRATEGIES) == {"variance_split", "top", "bottom", "last", "random", "laet"}
    # "laet" needs probe scores (tests/test_embed_probes.py); the others work on a plain list. The choices that
    # weigh cost are laet_fast.cost's (tests/test_cost.py).
    assert all(len(select_layers([1.0, 2.0, 3.0, 4.0], strategy=s, k=None if s == "variance_split" else 2)) >= 1
               for s in STRATEGIES if s != "laet")


def test_repeated_variance_split_splits_the_high_group_again():
    """IR-Tuning's split_num=2: the second split runs on the high group of the first, same bounds."""
    rng = np.random.default_rng(7)
    values = rng.permutation(np.concatenate([rng.normal(1, 0.1, 12), rng.normal(3, 0.1, 10),
                                             rng.normal(6, 0.1, 8)])).tolist()
    once = select_layers({"grad_norm": values})
    twice = select_layers({"grad_norm": values}, splits=2)
    order = sorted(range(30), key=lambda i: values[i])
    first = variance_split(sorted(values), 0.35, 0.65)
    second = variance_split(sorted(values)[first:], 0.35, 0.65)
    assert once.layers == tuple(sorted(order[first:]))
    assert twice.layers == tuple(sorted(order[first + second:]))
    assert len(twice) == 8 and set(twice.layers) < set(once.layers)  # the top cluster
    assert twice.params == {"low": 0.35, "high": 0.65, "split": first + second, "splits": 2}
    assert Selection.from_dict(twice.to_dict()) == twice


def test_warns_when_the_split_lands_on_a_bound():
    # A gap outside the bounds: 25 low layers and 5 high ones. Every allowed split mixes both in one
    # group, least so at the lower bound, which then sets the size (SmolLM2's gradient norms do this:
    # 19 of 30 blocks kept); 5 low and 25 high land on the upper bound.
    few_high = [0.01 * i for i in range(25)] + [10.0] * 5
    with pytest.warns(UserWarning, match=r"landed on its lower bound \(low=0.35: keeps 19 of 30 layers\)"):
        assert len(select_layers({"grad_norm": few_high})) == 19
    few_low = [0.0] * 5 + [10.0 + 0.01 * i for i in range(25)]
    with pytest.warns(UserWarning, match=r"landed on its upper bound \(high=0.65: keeps 11 of 30 layers\)"):
        assert len(select_layers({"grad_norm": few_low})) == 11
    gap = [0.0] * 15 + [10.0] * 15  # a clear gap in the middle: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(select_layers({"grad_norm": gap})) == 15


@pytest.mark.parametrize("content,match", [
    ("{not json", "cannot read a Selection from"),
    ("[1, 2]", "expected an object with 'layers' and 'num_layers', got a list"),
    ('{"layers": [1]}', "no 'num_layers'"),
    ('{"num_layers": 4}', "no 'layers'"),
    ('{"layers": "12", "num_layers": 30}', "'layers' must be a list of block indices, got '12'"),
    ('{"layers": [1, 2.5], "num_layers": 4}', "'layers' must be a list of block indices"),
    ('{"layers": [1], "num_layers": "4"}', "'num_layers' must be an integer"),
    ('{"layers": [1], "num_layers": 4, "params": [1]}', "'params' must be an object"),
    ('{"layers": [5], "num_layers": 4}', "out of range"),
])
def test_from_json_validates(tmp_path, content, match):
    path = tmp_path / "sel.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        Selection.from_json(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="cannot read a Selection"):
        Selection.from_json(str(tmp_path / "missing.json"))


def test_selection_is_a_leaf():
    """selection.py imports no other laet_fast module, lazily or not: cost, memory and the PEFT bridge build on it
    (cost-aware choices are laet_fast.cost's, the PEFT config is peft_bridge.to_peft_config)."""
    import ast
    import inspect

    import laet_fast.selection as selection

    tree = ast.parse(inspect.getsource(selection))
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("laet_fast") or name.startswith(".") or name == ""}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))

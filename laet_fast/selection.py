"""Choose which layers to train from per-layer scores (IR-Tuning's variance split and baselines)."""
from __future__ import annotations

import json
import math
import numbers
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

STRATEGIES = ("variance_split", "top", "bottom", "last", "random", "laet")
# Choices that weigh a block set's cost too live above this module, in laet_fast.cost.
COST_STRATEGIES = {"cost_aware": "laet_fast.cost.cost_aware_selection(scores, cost_model, metric=..., budget_s=...)",
                   "laet_cost": "laet_fast.cost.laet_cost_selection(acc, f1, cost_model, ...)"}


@dataclass(frozen=True)
class Selection:
    """A set of layers chosen for training.

    Attributes:
        layers: sorted indices of the selected blocks.
        num_layers: how many blocks the model has (a selection is refused on a model of another depth).
        strategy: the strategy that made it; ``params`` holds its parameters (k, bounds, seed, ...).
        metric: the metric the scores came from, or None for score-free strategies.
        scores: the per-layer scores the choice was made from (empty when none were used).
    """

    layers: tuple[int, ...]
    num_layers: int
    strategy: str = "manual"
    metric: str | None = None
    scores: tuple[float, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        layers = tuple(sorted(int(i) for i in self.layers))
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))
        object.__setattr__(self, "params", dict(self.params))
        if len(set(layers)) != len(layers):
            raise ValueError(f"Selection has repeated layer indices {list(layers)}; list each layer once.")
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"Selection indices {bad} are out of range for a model with {self.num_layers} layers "
                f"(valid: 0..{self.num_layers - 1})."
            )

    @property
    def lowest(self) -> int | None:
        """The lowest selected block, where the backward pass can stop; None if nothing is selected."""
        return self.layers[0] if self.layers else None

    def __contains__(self, index: int) -> bool:
        return index in self.layers

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        metric = f", metric={self.metric!r}" if self.metric else ""
        return f"Selection(layers={list(self.layers)} of {self.num_layers}, strategy={self.strategy!r}{metric}{extra})"

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "num_layers": self.num_layers,
            "strategy": self.strategy,
            "metric": self.metric,
            # Strict JSON: NaN as null, infinities as the strings "inf" / "-inf".
            "scores": [s if math.isfinite(s) else None if math.isnan(s) else str(s) for s in self.scores],
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Selection":
        """A Selection from ``to_dict``'s output; ValueError naming what is missing or of the wrong type."""
        if not isinstance(data, Mapping):
            raise ValueError(f"not a Selection record: expected an object with 'layers' and 'num_layers', got a "
                             f"{type(data).__name__}.")
        missing = [key for key in ("layers", "num_layers") if key not in data]
        if missing:
            raise ValueError(f"not a Selection record: no {' or '.join(repr(k) for k in missing)} "
                             f"(keys found: {sorted(map(str, data))}).")
        layers, num_layers = data["layers"], data["num_layers"]
        if not isinstance(layers, list) or not all(_is_int(i) for i in layers):
            raise ValueError(f"Selection record: 'layers' must be a list of block indices, got {layers!r}.")
        if not _is_int(num_layers):
            raise ValueError(f"Selection record: 'num_layers' must be an integer, got {num_layers!r}.")
        params = data.get("params") or {}
        if not isinstance(params, Mapping):
            raise ValueError(f"Selection record: 'params' must be an object, got {params!r}.")
        try:
            scores = [float("nan") if s is None else float(s) for s in data.get("scores") or ()]
        except (TypeError, ValueError):
            raise ValueError(f"Selection record: 'scores' must be a list of numbers, got {data['scores']!r}.") from None
        return cls(
            layers=tuple(layers),
            num_layers=num_layers,
            strategy=str(data.get("strategy") or "manual"),
            metric=data.get("metric"),
            scores=tuple(scores),
            params=params,
        )

    def to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, path: str) -> "Selection":
        """Read ``to_json``'s file; ValueError for an unreadable file, bad JSON or not a Selection record."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read a Selection from {path}: {err}") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def check_model(self, num_layers: int) -> None:
        """Refuse a selection made for a model with another number of blocks."""
        if num_layers != self.num_layers:
            raise ValueError(
                f"This selection was made for a model with {self.num_layers} layers, but the model has "
                f"{num_layers}; re-run the selection on this model."
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _split_bounds(n: int, low: float, high: float) -> tuple[int, int]:
    """The allowed split points ``lo..hi`` of ``variance_split`` for ``n`` values."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"variance_split needs 0 <= low <= high <= 1, got low={low}, high={high}.")
    # The tolerance keeps products such as 0.35 * 20 = 7.000000000000001 on the intended integer.
    lo = max(1, math.ceil(low * n - 1e-9))
    hi = min(n - 1, math.floor(high * n + 1e-9))
    if lo > hi:
        raise ValueError(
            f"variance_split bounds low={low}, high={high} leave no split point for {n} layers; widen the bounds."
        )
    return lo, hi


def variance_split(values: Sequence[float], low: float = 0.35, high: float = 0.65) -> int:
    """Index ``s`` into ascending-sorted ``values`` that minimises var(values[:s]) + var(values[s:]).

    The split is restricted to ``ceil(low*n) <= s <= floor(high*n)`` (at least one layer per side).
    Population variances are used, as in IR-Tuning. Ties go to the smallest ``s``.
    """
    lo, hi = _split_bounds(len(values), low, high)

    def var(xs: Sequence[float]) -> float:
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    return min(range(lo, hi + 1), key=lambda s: var(values[:s]) + var(values[s:]))


def scores_of(scores: Any, metric: str) -> list[float]:
    """Per-layer values of ``metric`` from a LayerScores, a mapping, or a plain sequence."""
    if isinstance(scores, Mapping) or hasattr(scores, "keys"):
        if metric not in scores:
            raise ValueError(
                f"The scores have no metric {metric!r}; available: {sorted(scores.keys())}. "
                f"Score with that metric first (e.g. LayerProbe(model, grad_norms=True) for 'grad_norm')."
            )
        return [float(v) for v in scores[metric]]
    return [float(v) for v in scores]


def _num_scored_layers(scores: Any) -> int:
    """How many layers a LayerScores, mapping or sequence covers (for score-free strategies)."""
    if isinstance(scores, Mapping) or hasattr(scores, "keys"):
        lengths = {len(scores[m]) for m in scores.keys()}
        if len(lengths) != 1:
            raise ValueError("The scores give no metric, or metrics of different lengths; pass num_layers=.")
        return lengths.pop()
    return len(scores)


def select_layers(
    scores: Any,
    metric: str = "grad_norm",
    strategy: str = "variance_split",
    k: int | None = None,
    low: float = 0.35,
    high: float = 0.65,
    seed: int = 0,
    num_layers: int | None = None,
    splits: int = 1,
    margin: float = 0.5,
) -> Selection:
    """Choose the layers to train.

    Args:
        scores: a ``LayerScores``, a mapping ``metric -> list of per-layer floats``, or a list of floats.
            Not needed (may be None) for ``"last"`` and ``"random"`` when ``num_layers`` is given.
        metric: which metric to rank by.
        strategy: ``"variance_split"`` (IR-Tuning: sort, split where var(low)+var(high) is smallest,
            split point between ``low`` and ``high`` fractions of the layers, keep the high group),
            ``"top"`` (k highest), ``"bottom"`` (k lowest), ``"last"`` (the last k blocks, the
            freeze-tuning baseline) or ``"random"`` (k blocks drawn with ``seed``, LISA-like).
        k: number of layers for the top/bottom/last/random strategies.
        low, high: bounds of the variance split point, as fractions of the (finite-scored) layers.
        seed: seed of the ``"random"`` strategy (same seed, same layers).
        num_layers: depth of the model; checked against the scores when both are given.
        splits: variance split only: how many times to split, each time again within the high group
            (IR-Tuning's ``split_num``; 2 keeps about a quarter of the layers with the default bounds).
            A split that lands on a bound (``low`` or ``high``) is warned about: the scores had no
            clearer gap inside the bounds, and the bound, not the scores, chose the group size.
        margin: ``"laet"`` only (see ``laet_keep``): LAET's choice from probe scores, which needs the
            metrics ``probe_acc`` and ``probe_f1`` (``laet_fast.embed.probe_layers``); ``metric`` and ``k``
            are not used.

    The choices that weigh what a block set costs to train are ``laet_fast.cost.cost_aware_selection`` (the
    highest total score within a time or memory budget) and ``laet_fast.cost.laet_cost_selection`` (LAET's
    kept blocks, cut to the cheapest set that holds the best probe's block).

    Non-finite scores never get a layer selected by a score-based strategy: those layers are left
    out of the ranking and of the variance split, and a ValueError says so when too few finite
    scores remain. Score-free strategies (``"last"``, ``"random"``) ignore the scores' values.
    """
    if strategy in COST_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} weighs cost too: call {COST_STRATEGIES[strategy]}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if strategy == "laet":
        if k is not None:
            raise ValueError(f"k={k!r} is not used by strategy='laet', which keeps every layer no other layer "
                             f"clearly beats; lower or raise margin= instead.")
        return _select_laet(scores, margin, num_layers)
    score_based = strategy in ("variance_split", "top", "bottom")
    if score_based and scores is None:
        raise ValueError(f"strategy={strategy!r} needs scores.")
    values = scores_of(scores, metric) if scores is not None and score_based else None
    if values is not None and num_layers is not None and len(values) != num_layers:
        raise ValueError(
            f"The scores cover {len(values)} layers but num_layers={num_layers}; score this model first."
        )
    n = len(values) if values is not None else num_layers
    if n is None and scores is not None:
        n = _num_scored_layers(scores)
    if n is None:
        raise ValueError(f"strategy={strategy!r} without scores needs num_layers=.")
    if n == 0:
        raise ValueError("Cannot select from zero layers.")
    if strategy == "variance_split":
        if k is not None:
            raise ValueError(f"k={k!r} is not used by strategy='variance_split', which sizes the group from the "
                             f"scores; use strategy='top' with k=, or splits=2 for a smaller variance-split group.")
        if not _is_int(splits) or splits < 1:
            raise ValueError(f"splits={splits!r}: the number of variance splits must be an integer >= 1.")
    else:
        if k is None:
            raise ValueError(f"strategy={strategy!r} needs k=, the number of layers to train.")
        if not _is_int(k):
            raise ValueError(f"k={k!r} must be an integer number of layers (e.g. k={int(k)})."
                             if isinstance(k, float) and k.is_integer() else
                             f"k={k!r} must be an integer number of layers.")
        if splits != 1:
            raise ValueError(f"splits={splits!r} applies to strategy='variance_split' only.")
        if not 1 <= k <= n:
            raise ValueError(f"k={k} is out of range: the model has {n} layers, so choose 1 <= k <= {n}.")

    # Non-finite scores (NaN / Inf) take no part in score-based choices.
    finite = [i for i in range(n) if math.isfinite(values[i])] if values is not None else []
    if score_based:
        needed = 2 ** splits if strategy == "variance_split" else k
        if len(finite) < needed:
            bad = [i for i in range(n) if i not in finite]
            raise ValueError(
                f"Only {len(finite)} of {n} layers have a finite {metric!r} score (non-finite: {bad}); "
                f"strategy={strategy!r} needs at least {needed}. Re-score the model or choose a smaller k."
            )

    params: dict[str, Any] = {}
    if strategy == "variance_split":
        order = sorted(finite, key=lambda i: values[i])
        split = 0  # where the kept (high) group starts in ``order``
        for round_ in range(1, splits + 1):
            group = [values[i] for i in order[split:]]
            lo, hi = _split_bounds(len(group), low, high)
            cut = variance_split(group, low, high)
            if lo < hi and cut in (lo, hi):
                warnings.warn(
                    f"select_layers: variance split {round_} of {splits} landed on its "
                    f"{'lower' if cut == lo else 'upper'} bound ({'low' if cut == lo else 'high'}="
                    f"{low if cut == lo else high}: keeps {len(group) - cut} of {len(group)} layers); the "
                    f"{metric!r} scores have no clearer gap inside the bounds, so the bound set the size. Widen "
                    f"low/high, or use splits= or strategy='top' with k=.", stacklevel=2)
            split += cut
        chosen = order[split:]
        params = {"low": low, "high": high, "split": split}
        if splits != 1:
            params["splits"] = splits
    elif strategy in ("top", "bottom"):
        order = sorted(finite, key=lambda i: values[i], reverse=strategy == "top")
        chosen = order[:k]
        params = {"k": k}
    elif strategy == "last":
        chosen = list(range(n - k, n))
        params = {"k": k}
    else:
        chosen = random.Random(seed).sample(range(n), k)
        params = {"k": k, "seed": seed}
    return Selection(
        layers=tuple(chosen),
        num_layers=n,
        strategy=strategy,
        metric=metric if values is not None else None,
        scores=tuple(values or ()),
        params=params,
    )


LAET_METRICS = ("probe_acc", "probe_f1")


def laet_keep(acc: Sequence[float], f1: Sequence[float], margin: float = 0.5) -> list[int]:
    """LAET's layer choice: the layers that no other layer clearly beats on both probe metrics.

    Layer i is dropped when some layer j has ``acc[j] - acc[i] >= margin * sd(acc)`` and
    ``f1[j] - f1[i] >= margin * sd(f1)``, sd being the population standard deviation of that metric
    across the (finite-scored) layers, and j better than i on at least one of them (so that equal
    layers never drop each other); every other finite-scored layer is kept, so the best layer always
    is. Layers with a non-finite score are never kept nor used to beat another. When all layers score
    the same (sd 0), all are kept.
    """
    if not margin >= 0:
        raise ValueError(f"margin={margin!r} must be >= 0 (LAET uses 0.5).")
    if len(acc) != len(f1):
        raise ValueError(f"probe_acc has {len(acc)} values but probe_f1 has {len(f1)}; score every layer once.")
    finite = [i for i in range(len(acc)) if math.isfinite(acc[i]) and math.isfinite(f1[i])]
    if not finite:
        raise ValueError("no layer has finite probe_acc and probe_f1 scores; re-run the probes.")

    def sd(values):
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))

    acc_gap = margin * sd([acc[i] for i in finite])
    f1_gap = margin * sd([f1[i] for i in finite])
    def beats(j, i):
        return (acc[j] - acc[i] >= acc_gap and f1[j] - f1[i] >= f1_gap
                and (acc[j] > acc[i] or f1[j] > f1[i]))

    return [i for i in finite if not any(beats(j, i) for j in finite if j != i)]


def laet_scores(scores: Any, num_layers: int | None = None) -> tuple[list[float], list[float]]:
    """(probe_acc, probe_f1) per layer from LAET's probe scores, checked."""
    if scores is None or not (isinstance(scores, Mapping) or hasattr(scores, "keys")) or any(
            m not in scores for m in LAET_METRICS):
        raise ValueError("LAET (strategy 'laet', laet_cost_selection) needs probe scores with 'probe_acc' and "
                         "'probe_f1' per layer: run laet_fast.embed.probe_layers(layer_embeddings(...), labels) first.")
    acc, f1 = ([float(v) for v in scores[m]] for m in LAET_METRICS)
    if num_layers is not None and len(acc) != num_layers:
        raise ValueError(f"The scores cover {len(acc)} layers but num_layers={num_layers}; score this model first.")
    return acc, f1


def _select_laet(scores: Any, margin: float, num_layers: int | None) -> Selection:
    acc, f1 = laet_scores(scores, num_layers)
    return Selection(layers=tuple(laet_keep(acc, f1, margin)), num_layers=len(acc), strategy="laet",
                     metric="probe_acc", scores=tuple(acc), params={"margin": margin})

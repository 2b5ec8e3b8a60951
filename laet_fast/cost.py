"""Predict the time of one layer-selective training step from its work, part by part, and choose layers by cost.

The step is the one ``laet_fast.memory.plan_memory`` plans: ``out = model(ids, labels=ids); out.loss.backward();
opt.step()`` on a decoder prepared by ``apply_selection`` (selected blocks trainable, the rest frozen and
optionally NF4/FP4-quantized, the backward pass cut below the lowest trained block). Its work splits into
parts, each counted in its own unit (``T = batch * seq`` tokens, ``S = seq``, a linear ``out x in``):

* ``forward``: matmul FLOPs of every block and the LM head, ``2 T out in`` per linear plus attention's
  ``QK^T`` and ``PV``, ``4 B heads S^2 head_dim`` per block;
* ``backward_input``: the input gradients from the loss down to the cut. Every block from the lowest
  trained one up, trained or frozen, passes a gradient to its input (``2 T out in`` per linear,
  attention ``8 B heads S^2 head_dim``), and the LM head passes one to the last hidden state;
* ``backward_weight``: weight gradients of the trained blocks (``2 T out in`` per linear), and of the head
  when it trains;
* ``dequant``: elements of frozen 4-bit weights dequantized in the step: bitsandbytes' 4-bit matmul
  dequantizes the whole weight at every forward, and once more at its backward in the blocks above the cut;
* ``optimizer``: trained parameter elements updated by ``opt.step()``.

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``'s convention (a multiply-add is 2 FLOPs,
attention counted without causal masking, elementwise operators not counted). A calibration turns each
part into seconds with one effective rate per part; the rates are fitted from measured step times
(:func:`fit_calibration`), so the uncounted elementwise work (norms, SiLU, softmax, cross-entropy, Python
overhead), proportional to the counted work at the calibrated batch and sequence length, is folded into
them. Calibrate at the shape you train with.

Choosing layers by cost: a step's time and memory depend on the lowest trained block (the cut) and on
which blocks above it train. :func:`tradeoff_curve` enumerates every cut ``c`` and every count ``k``,
takes ``c`` plus the ``k - 1`` most important blocks above it, and costs that set; :func:`choose_layers`
returns the most important set within a budget. For step time this is exact: all blocks of a model have the
same shape, so every set with the same cut and count costs the same time and the most important of them
is the one taken.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from laet_fast.memory import GIB, extra_parts, layers_of, block_shape, plan_memory
from laet_fast.selection import Selection, laet_keep, scores_of

PARTS = ("forward", "backward_input", "backward_weight", "dequant", "optimizer")
UNITS = {"forward": "FLOP", "backward_input": "FLOP", "backward_weight": "FLOP", "dequant": "element",
         "optimizer": "element"}
FOUR_BIT = ("nf4", "fp4")


@dataclass(frozen=True)
class MatmulShape:
    """What the step-time model needs of a decoder: its linears, attention and head sizes.

    Attributes:
        linears: (out_features, in_features) of each linear layer of one block.
        block_params: parameter elements of one block (weights, biases, norms).
        head_params: parameter elements of the embeddings, final norm and (untied) LM head, by part name.
    """

    hidden: int
    num_layers: int
    heads: int
    head_dim: int
    vocab: int
    linears: tuple[tuple[int, int], ...]
    block_params: int
    head_params: Mapping[str, int]
    tied: bool
    name: str = ""


def matmul_shape(config: Any) -> MatmulShape:
    """Read the shape of a Llama-style decoder (as ``plan_memory`` does) or of GPT-2 from its config.

    Raises:
        ValueError: neither kind of config (the error of ``laet_fast.memory.block_shape``).
    """
    read = (lambda key, default=None: config.get(key, default)) if isinstance(config, Mapping) else \
        (lambda key, default=None: getattr(config, key, default))
    if read("model_type") == "gpt2":
        h, layers, vocab = read("n_embd"), read("n_layer"), read("vocab_size")
        inner = read("n_inner") or 4 * h
        linears = ((3 * h, h), (h, h), (inner, h), (h, inner))
        block_params = sum(o * i + o for o, i in linears) + 4 * h  # Conv1D biases, two LayerNorms
        positions = read("n_positions")
        return MatmulShape(hidden=h, num_layers=layers, heads=read("n_head"), head_dim=h // read("n_head"),
                           vocab=vocab, linears=linears, block_params=block_params,
                           head_params={"embeddings": vocab * h + positions * h, "final_norm": 2 * h}, tied=True,
                           name=str(read("name_or_path", "") or "gpt2"))
    shape = block_shape(config)
    head_params = {"embeddings": shape.vocab * shape.hidden, "final_norm": shape.hidden}
    if not shape.tied:
        head_params["lm_head"] = shape.vocab * shape.hidden
    return MatmulShape(hidden=shape.hidden, num_layers=shape.num_layers, heads=shape.heads, head_dim=shape.head_dim,
                       vocab=shape.vocab, linears=tuple((o, i) for o, i, _ in shape.linears()),
                       block_params=sum(shape.block_param_sizes()), head_params=head_params, tied=shape.tied,
                       name=shape.name)


@dataclass(frozen=True)
class StepTimeCalibration:
    """Effective rates of one device, one per part of the step (units per second, see ``UNITS``).

    Attributes:
        rates: part -> units per second (FLOP/s for the matmul parts, elements/s for dequant and optimizer).
        device: where they were measured; ``threads`` the CPU threads used; ``source`` how (a file, a fit).
        fitted: the parts whose rates were fitted from step times; the others came from the base calibration.
    """

    rates: Mapping[str, float]
    device: str = ""
    threads: int | None = None
    source: str = ""
    fitted: tuple[str, ...] = ()

    def __post_init__(self):
        missing = [part for part in PARTS if part not in self.rates]
        bad = [part for part, rate in self.rates.items() if not (isinstance(rate, (int, float)) and rate > 0)]
        if missing or bad:
            raise ValueError(f"A calibration needs a positive rate for each of {', '.join(PARTS)}; "
                             f"missing {missing}, not positive {bad}.")
        object.__setattr__(self, "rates", {part: float(self.rates[part]) for part in PARTS})
        object.__setattr__(self, "fitted", tuple(self.fitted))

    def seconds(self, work: Mapping[str, float]) -> dict[str, float]:
        """Seconds of each part for ``work`` (part -> units)."""
        return {part: work.get(part, 0) / self.rates[part] for part in PARTS}

    def to_dict(self) -> dict:
        return {**asdict(self), "rates": dict(self.rates), "fitted": list(self.fitted)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepTimeCalibration":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def from_json(cls, path: str, key: str = "calibration") -> "StepTimeCalibration":
        """Read a calibration from a JSON file: the object itself or the one under ``key`` (cost_check's output)."""
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return cls.from_dict(data.get(key, data))


# Fitted by benchmarks/cost_check.py on SmolLM2-135M, fp32, batch 2 x seq 128, one thread of a shared 2-core
# x86_64 CPU (AVX512), 2026-12-02: 11 selections fitted, 5 held out (held-out |error| mean 3.1%, max 5.6%);
# the optimizer's rate measured alone. benchmarks/results/cost_model.json has the measurements.
CPU_DEFAULT = StepTimeCalibration(
    rates={"forward": 73.8e9, "backward_input": 76.1e9, "backward_weight": 37.4e9, "dequant": 737e6,
           "optimizer": 287e6},
    device="cpu", threads=1, source="benchmarks/results/cost_model.json (SmolLM2-135M fp32, 2 x 128 tokens)",
    fitted=("forward", "backward_input", "backward_weight", "dequant"))


@dataclass
class StepTimePlan:
    """Predicted time of one training step, part by part (see the module docstring).

    Attributes:
        work: part -> units of work (FLOPs or elements, ``UNITS``).
        seconds: part -> predicted seconds; ``total_s`` their sum.
        block_flops: forward matmul FLOPs of one block (the unit behind the other terms).
        lowest: the lowest block the backward pass reaches (``num_layers`` when none, -1 through the embeddings).
    """

    work: dict[str, float]
    seconds: dict[str, float]
    total_s: float
    block_flops: int
    lowest: int
    layers: tuple[int, ...]
    num_layers: int
    seq_len: int
    batch_size: int
    quantize_frozen: str | None = None
    train_extra: tuple[str, ...] = ()
    model: str = ""
    calibration: str = ""

    @property
    def flops(self) -> int:
        """Matmul FLOPs of the step (forward and backward), as ``FlopCounterMode`` counts them."""
        return int(self.work["forward"] + self.work["backward_input"] + self.work["backward_weight"])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"], data["train_extra"] = list(self.layers), list(self.train_extra)
        return data

    def __str__(self) -> str:
        lines = [f"Step time plan for {self.model or 'model'}: train {len(self.layers)} of {self.num_layers} blocks "
                 f"(backward down to block {self.lowest}), seq {self.seq_len} x batch {self.batch_size}, frozen "
                 f"blocks {self.quantize_frozen or 'not quantized'}",
                 f"  {'part':<18}{'work':>14}  {'unit':<8}{'seconds':>9}"]
        for part in PARTS:
            lines.append(f"  {part:<18}{self.work[part]:>14.4g}  {UNITS[part]:<8}{self.seconds[part]:>9.3f}")
        lines.append(f"  {'total':<18}{'':>14}  {'':<8}{self.total_s:>9.3f}   (rates: {self.calibration})")
        return "\n".join(lines)


def _four_bit(quantize_frozen: str | None) -> bool:
    mode = None if quantize_frozen is None else str(quantize_frozen).strip().lower()
    if mode not in (None, "none", "int8", *FOUR_BIT):
        raise ValueError(f"Unknown quantization {quantize_frozen!r}; choose None, 'none', 'nf4', 'fp4' or 'int8'.")
    return mode in FOUR_BIT


def plan_step_time(
    config: Any,
    selection_or_k: Selection | Sequence[int] | int,
    seq_len: int,
    batch_size: int = 1,
    quantize_frozen: str | None = None,
    train_extra: Sequence[str] = (),
    calibration: StepTimeCalibration | None = None,
) -> StepTimePlan:
    """Predict the time of one training step of a decoder under a layer selection.

    Args:
        config: a transformers config of a Llama-style decoder or GPT-2 (or a config.json dict).
        selection_or_k: a ``Selection``, a list of block indices, or an int ``k`` for the last ``k`` blocks.
        seq_len, batch_size: tokens per sequence and sequences per step.
        quantize_frozen: None, "nf4"/"fp4" (adds the dequantization of frozen weights) or "int8" (counted
            like unquantized weights: its matmul works on the int8 weight directly).
        train_extra: further trained parts ("embed_tokens", "norm", "lm_head"), as in ``plan_memory``.
        calibration: the device's rates; default :data:`CPU_DEFAULT`.

    Returns:
        A :class:`StepTimePlan` with the work and seconds of each part.
    """
    shape = matmul_shape(config)
    calibration = calibration or CPU_DEFAULT
    four_bit = _four_bit(quantize_frozen)
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    layers = layers_of(selection_or_k, shape.num_layers)
    extra = extra_parts(train_extra)
    if shape.tied and "lm_head" in extra:
        extra = (extra - {"lm_head"}) | {"embeddings"}  # a tied head is the embedding matrix
    tokens, n = batch_size * seq_len, shape.num_layers
    linear_flops = sum(2 * tokens * out_f * in_f for out_f, in_f in shape.linears)
    attention_flops = 4 * batch_size * shape.heads * seq_len * seq_len * shape.head_dim
    head_flops = 2 * tokens * shape.hidden * shape.vocab
    linear_elements = sum(out_f * in_f for out_f, in_f in shape.linears)

    lowest = -1 if "embeddings" in extra else (min(layers) if layers else n)
    in_backward = [i for i in range(max(lowest, 0), n)]
    frozen = n - len(layers)
    frozen_in_backward = len(in_backward) - len(layers)
    head_trained = "lm_head" in extra or (shape.tied and "embeddings" in extra)
    head_passes_gradient = lowest < n or "final_norm" in extra
    work = {
        "forward": n * (linear_flops + attention_flops) + head_flops,
        "backward_input": len(in_backward) * (linear_flops + 2 * attention_flops)
        + (head_flops if head_passes_gradient else 0),
        "backward_weight": len(layers) * linear_flops + (head_flops if head_trained else 0),
        "dequant": (frozen + frozen_in_backward) * linear_elements if four_bit else 0,
        "optimizer": len(layers) * shape.block_params + sum(size for part, size in shape.head_params.items()
                                                            if part in extra),
    }
    seconds = calibration.seconds(work)
    return StepTimePlan(
        work=work, seconds=seconds, total_s=sum(seconds.values()), block_flops=linear_flops + attention_flops,
        lowest=lowest, layers=tuple(layers), num_layers=n, seq_len=seq_len, batch_size=batch_size,
        quantize_frozen=str(quantize_frozen).lower() if four_bit or quantize_frozen == "int8" else None,
        train_extra=tuple(sorted(extra)), model=shape.name,
        calibration=f"{calibration.device or 'device'}, {calibration.source}".strip(", "))


def fit_calibration(
    plans: Sequence[StepTimePlan],
    measured_s: Sequence[float],
    base: StepTimeCalibration | None = None,
    device: str = "",
    threads: int | None = None,
    source: str = "fitted",
) -> StepTimeCalibration:
    """Fit the rates of a device from measured step times (least squares on the relative error).

    The model is ``t = sum_part work[part] / rate[part]``, linear in the seconds per unit; each row is
    divided by its measured time, so every selection weighs the same however long its step. A part is
    fitted only when its work varies independently of the parts fitted before it, in the order of
    ``PARTS``: at one batch and sequence length the forward work is the same for every selection (it
    acts as the intercept), and the optimizer's elements are proportional to the weight-gradient FLOPs, so
    such parts keep ``base``'s rate and their predicted seconds are taken off the targets first. A part
    whose fitted seconds per unit come out negative keeps the base rate too.

    Args:
        plans: step plans of the measured configurations (``plan_step_time``).
        measured_s: their measured seconds per step (medians over rounds, say), same order.
        base: rates for the parts the measurements cannot separate; default :data:`CPU_DEFAULT`.
    """
    import numpy as np

    if len(plans) != len(measured_s) or not plans:
        raise ValueError(f"fit_calibration needs one measured time per plan; got {len(plans)} plans and "
                         f"{len(measured_s)} times.")
    times = np.asarray(measured_s, dtype=np.float64)
    if not np.all(times > 0):
        raise ValueError(f"Measured step times must be positive seconds, got {list(measured_s)}.")
    base = base or CPU_DEFAULT
    work = np.array([[plan.work[part] for part in PARTS] for plan in plans], dtype=np.float64)
    scale = work.max(axis=0)
    scale[scale == 0] = 1.0
    unit = work / scale / times[:, None]  # relative rows, columns of comparable size
    fitted: list[int] = []
    for column in range(len(PARTS)):
        trial = fitted + [column]
        if np.linalg.matrix_rank(unit[:, trial], tol=1e-9) == len(trial):
            fitted = trial
    while fitted:
        kept = [c for c in range(len(PARTS)) if c not in fitted]
        rest = sum(work[:, c] / base.rates[PARTS[c]] for c in kept) if kept else 0.0
        target = (times - rest) / times
        coef, *_ = np.linalg.lstsq(unit[:, fitted], target, rcond=None)
        if coef.min() > 0:
            break
        fitted.pop(int(np.argmin(coef)))
    rates = dict(base.rates)
    for column, value in zip(fitted, coef if fitted else ()):
        rates[PARTS[column]] = float(scale[column] / value)
    return StepTimeCalibration(rates=rates, device=device or base.device, threads=threads, source=source,
                               fitted=tuple(PARTS[c] for c in fitted))


@dataclass(frozen=True)
class CostModel:
    """A training setup to cost layer selections in: the model config, the step's shape and the device.

    ``quantize_frozen``, ``dtype``, ``optimizer`` and ``attn_implementation`` are ``plan_memory``'s options
    (memory costs need a Llama-style config); ``calibration`` the device's rates (default :data:`CPU_DEFAULT`).
    """

    config: Any
    seq_len: int
    batch_size: int = 1
    quantize_frozen: str | None = None
    dtype: Any = "bf16"
    optimizer: str = "adamw"
    attn_implementation: str = "sdpa"
    calibration: StepTimeCalibration | None = None

    @property
    def num_layers(self) -> int:
        return matmul_shape(self.config).num_layers

    def time(self, layers: Sequence[int]) -> StepTimePlan:
        """The step-time plan of training ``layers``."""
        return plan_step_time(self.config, list(layers), self.seq_len, self.batch_size,
                              quantize_frozen=self.quantize_frozen, calibration=self.calibration)

    def memory(self, layers: Sequence[int]):
        """The ``plan_memory`` plan of training ``layers``."""
        return plan_memory(self.config, list(layers), self.seq_len, self.batch_size,
                           quantize_frozen=self.quantize_frozen, optimizer=self.optimizer, dtype=self.dtype,
                           attn_implementation=self.attn_implementation)


@dataclass(frozen=True)
class TradeoffPoint:
    """One candidate set: its blocks, total importance, predicted seconds per step and memory (GiB)."""

    layers: tuple[int, ...]
    importance: float
    seconds: float
    memory_gb: float | None

    @property
    def lowest(self) -> int:
        return self.layers[0]


@dataclass
class TradeoffCurve:
    """Every (cut, count) candidate of a model and the importance-vs-cost frontier among them.

    Attributes:
        points: for each cut ``c`` and count ``k``, ``c`` plus the ``k - 1`` most important blocks above it.
        metric: the score the importance sums.
        chosen: the point a budget chose, if any.
    """

    points: list[TradeoffPoint]
    metric: str | None = None
    chosen: TradeoffPoint | None = None
    budget: dict[str, float] = field(default_factory=dict)

    def frontier(self, cost: str = "seconds") -> list[TradeoffPoint]:
        """The points no other point beats on both importance and ``cost`` ("seconds" or "memory_gb"), by cost."""
        best, out = -math.inf, []
        for point in sorted(self.points, key=lambda p: (getattr(p, cost), -p.importance)):
            if point.importance > best:
                out.append(point)
                best = point.importance
        return out

    def to_dict(self) -> dict:
        def row(point):
            return None if point is None else {**asdict(point), "layers": list(point.layers)}

        return {"metric": self.metric, "budget": dict(self.budget), "chosen": row(self.chosen),
                "frontier_seconds": [row(p) for p in self.frontier("seconds")],
                "points": [row(p) for p in self.points]}

    def plot(self, path: str, cost: str = "seconds", title: str | None = None) -> str:
        """Write importance against predicted ``cost`` (all candidates, the frontier, the choice) to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        label = {"seconds": "predicted seconds per step", "memory_gb": "predicted peak memory (GiB)"}[cost]
        frontier = self.frontier(cost)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.scatter([getattr(p, cost) for p in self.points], [p.importance for p in self.points], s=8,
                   color="0.75", label="cut + most important blocks above it")
        ax.plot([getattr(p, cost) for p in frontier], [p.importance for p in frontier], "-o", ms=3,
                label="frontier")
        if self.chosen is not None:
            ax.scatter([getattr(self.chosen, cost)], [self.chosen.importance], s=80, marker="*", color="C3",
                       zorder=3, label=f"chosen: {list(self.chosen.layers)}")
        for key, value in self.budget.items():
            if (key == "budget_s" and cost == "seconds") or (key == "budget_gb" and cost == "memory_gb"):
                ax.axvline(value, color="C3", ls="--", lw=1, label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel(f"total importance ({self.metric or 'score'})")
        ax.set_title(title or "Importance against cost of the layer sets")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def tradeoff_curve(values: Sequence[float], cost_model: CostModel, metric: str | None = None,
                   memory: bool = True) -> TradeoffCurve:
    """All (cut, count) candidates for per-block importances ``values`` (higher = more important).

    Blocks with a non-finite value are never added above a cut nor used as one. ``memory=False`` skips
    ``plan_memory`` (for configs it cannot plan, such as GPT-2).
    """
    n = cost_model.num_layers
    if len(values) != n:
        raise ValueError(f"The scores cover {len(values)} layers but the model has {n}; score this model first.")
    finite = [i for i in range(n) if math.isfinite(values[i])]
    points = []
    for cut in finite:
        above = sorted((i for i in finite if i > cut), key=lambda i: (-values[i], i))
        for count in range(1, len(above) + 2):
            layers = tuple(sorted([cut, *above[:count - 1]]))
            gib = cost_model.memory(layers).total / GIB if memory else None
            points.append(TradeoffPoint(layers=layers, importance=sum(values[i] for i in layers),
                                        seconds=cost_model.time(layers).total_s, memory_gb=gib))
    return TradeoffCurve(points=points, metric=metric)


def _budget(budget_s, budget_gb, tradeoff) -> tuple[str, float]:
    """The one budget option given, checked: ``(name, value)``."""
    given = {name: value for name, value in (("budget_s", budget_s), ("budget_gb", budget_gb),
                                             ("tradeoff", tradeoff)) if value is not None}
    if len(given) != 1:
        raise ValueError(f"cost_aware_selection needs exactly one of budget_s=, budget_gb= or tradeoff=; got "
                         f"{', '.join(given) or 'none'}.")
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < 0 or (value == 0 and name != "tradeoff"):
        raise ValueError(f"{name}={value!r} must be a positive number" + (" (or 0)" if name == "tradeoff" else "")
                         + ".")
    return name, float(value)


def choose_layers(curve: TradeoffCurve, budget_s: float | None = None, budget_gb: float | None = None,
                  tradeoff: float | None = None) -> TradeoffPoint:
    """The most important candidate within ``budget_s`` seconds per step or ``budget_gb`` GiB, or the one
    maximising ``importance - tradeoff * seconds``; ties go to the cheaper. Exactly one option is given.

    Raises:
        ValueError: not exactly one option, a non-positive budget, or no candidate fits the budget.
    """
    name, value = _budget(budget_s, budget_gb, tradeoff)
    if not curve.points:
        raise ValueError("No layer has a finite score; re-score the model.")
    if name == "tradeoff":
        best = max(curve.points, key=lambda p: (p.importance - value * p.seconds, -p.seconds))
    else:
        cost = "seconds" if name == "budget_s" else "memory_gb"
        if cost == "memory_gb" and curve.points[0].memory_gb is None:
            raise ValueError("budget_gb needs memory plans; this curve was built with memory=False.")
        fits = [p for p in curve.points if getattr(p, cost) <= value]
        if not fits:
            cheapest = min(curve.points, key=lambda p: getattr(p, cost))
            unit = "s per step" if cost == "seconds" else "GiB"
            raise ValueError(f"No layer set fits {name}={value}: the cheapest, block {list(cheapest.layers)}, needs "
                             f"{getattr(cheapest, cost):.4g} {unit}. Raise the budget, or shorten the batch/sequence.")
        best = max(fits, key=lambda p: (p.importance, -getattr(p, cost)))
    curve.chosen, curve.budget = best, {name: value}
    return best


def cost_aware_selection(scores, cost_model: CostModel, metric: str | None = None,
                         budget_s: float | None = None, budget_gb: float | None = None,
                         tradeoff: float | None = None) -> tuple[Selection, TradeoffCurve]:
    """The most important block set within the budget, as a ``Selection``, and the trade-off curve it came from.

    Args:
        scores: one importance per block: a list, or a ``LayerScores`` / mapping read at ``metric``.
        cost_model: the setup (config, batch, sequence length, device rates) whose cost the budget limits.
        metric: the metric the importances are (needed to read a ``LayerScores`` or a mapping).
        budget_s, budget_gb, tradeoff: exactly one: the set with the highest total importance whose predicted
            step time (seconds) or memory (GiB) fits, or that maximises ``importance - tradeoff * seconds``.

    Returns:
        ``(selection, curve)``: strategy ``"cost_aware"``; the curve plots (``curve.plot(path)``) and
        serializes (``curve.to_dict()``).
    """
    if isinstance(scores, Mapping) or hasattr(scores, "keys"):
        if metric is None:
            raise ValueError("cost_aware_selection: name the metric to read from the scores (metric=...).")
        values = scores_of(scores, metric)
    else:
        values = [float(v) for v in scores]
    if cost_model is None or not isinstance(cost_model, CostModel):
        raise ValueError("cost_aware_selection needs cost_model=CostModel(config, seq_len=..., batch_size=...), "
                         "the setup whose step time and memory the budget limits.")
    _budget(budget_s, budget_gb, tradeoff)  # before the curve, which plans every candidate
    curve = tradeoff_curve(values, cost_model, metric, memory=budget_gb is not None or _plans_memory(cost_model))
    point = choose_layers(curve, budget_s=budget_s, budget_gb=budget_gb, tradeoff=tradeoff)
    params = {**curve.budget, "importance": point.importance, "predicted_s": point.seconds}
    if point.memory_gb is not None:
        params["predicted_gb"] = point.memory_gb
    selection = Selection(layers=point.layers, num_layers=len(values), strategy="cost_aware", metric=metric,
                          scores=tuple(values), params=params)
    return selection, curve


def laet_cost_selection(acc: Sequence[float], f1: Sequence[float], cost_model: CostModel | None = None,
                        margin: float = 0.5, k: int | None = None, budget_s: float | None = None,
                        budget_gb: float | None = None) -> tuple[Selection, TradeoffCurve]:
    """Cost-aware LAET: of the blocks LAET keeps, the set cheapest to train that holds the best probe's block.

    The set: ``best``, the kept block of highest probe accuracy (``acc``; ties to the lower block), plus the
    kept blocks above it, the most accurate first, as many as ``k`` and the budget allow (all without either).
    Why: a step's cost is set mostly by the lowest trained block, where the backward pass stops
    (``backward_input`` runs from the loss down to it); every set that holds ``best`` stops at ``best`` or
    lower, so ``best`` itself is the cheapest cut that keeps the block the probes trust most. Kept blocks
    below it would run the backward deeper for blocks the probes rank lower; kept blocks above it add only
    their weight gradients and optimizer state, and LAET found none of them clearly beaten, so they train
    unless ``k`` or the budget says otherwise. Each candidate is one of ``tradeoff_curve``'s points with cut
    ``best``, and a budget takes the most accurate that fits (``choose_layers``), as ``cost_aware`` does.

    Args:
        acc, f1: per-block ``probe_acc`` and ``probe_f1`` (``laet_fast.embed.probe_layers``).
        cost_model: the training setup the sets are costed in (needed).
        margin: LAET's margin (``laet_keep``).
        k: at most this many blocks.
        budget_s, budget_gb: at most one: predicted seconds per step or GiB of the set.

    Returns:
        ``(Selection, TradeoffCurve)``: strategy ``"laet_cost"``, params ``kept`` (LAET's set), ``best``,
        ``margin``, the predicted seconds (and GiB) of the set and the budget; the curve of the candidates.

    Raises:
        ValueError: no cost model, both budgets, a bad k or budget, or a budget that even ``[best]`` exceeds.
    """

    if cost_model is None or not isinstance(cost_model, CostModel):
        raise ValueError("strategy='laet_cost' needs cost_model=CostModel(config, seq_len=..., batch_size=...), "
                         "the setup whose step time and memory it compares.")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k={k!r} must be an integer >= 1.")
    budget = {name: value for name, value in (("budget_s", budget_s), ("budget_gb", budget_gb)) if value is not None}
    if len(budget) > 1:
        raise ValueError("give one of budget_s and budget_gb, not both.")
    if budget:
        _budget(budget_s, budget_gb, None)
    kept = laet_keep(acc, f1, margin)
    best = max(kept, key=lambda i: (acc[i], -i))
    candidates = [acc[i] if i in kept and i >= best else math.nan for i in range(len(acc))]
    memory = "budget_gb" in budget or _plans_memory(cost_model)
    curve = tradeoff_curve(candidates, cost_model, "probe_acc", memory=memory)
    curve.points = [p for p in curve.points if p.lowest == best and (k is None or len(p.layers) <= k)]
    if budget:
        point = choose_layers(curve, **budget)
    else:
        point = max(curve.points, key=lambda p: (p.importance, -p.seconds))
        curve.chosen = point
    params = {"margin": margin, "kept": kept, "best": best, **({"k": k} if k is not None else {}), **budget,
              "predicted_s": point.seconds}
    if point.memory_gb is not None:
        params["predicted_gb"] = point.memory_gb
    selection = Selection(layers=point.layers, num_layers=len(acc), strategy="laet_cost", metric="probe_acc",
                          scores=tuple(acc), params=params)
    return selection, curve


def _plans_memory(cost_model: CostModel) -> bool:
    try:
        block_shape(cost_model.config)
    except ValueError:
        return False
    return True

"""Per-layer scores: a read-only mapping ``metric -> [one float per block]`` with I/O and a plot."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Iterator, Sequence

# Column order of the table and plot for the metrics LayerProbe produces; other metrics follow, sorted.
METRIC_ORDER = ("block_influence", "relative_change", "act_rms", "act_absmax", "grad_norm", "grad_norm_sq")

_FORMAT_VERSION = 1


def _encode(value: float):
    """JSON has no NaN/Infinity: NaN becomes null, infinities the strings "inf" / "-inf"."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _decode(value) -> float:
    if value is None:
        return float("nan")
    return float(value)  # float("inf") / float("-inf") parse the encoded infinities


class LayerScores(Mapping):
    """Scores of each transformer block, one list of floats per metric.

    ``scores["block_influence"]`` is a list with one float per block, in block order; NaN marks a
    block that saw no tokens. The mapping is read-only.

    Attributes:
        names: the dotted path of each block, e.g. ``["model.layers.0", ...]``.
        num_tokens: how many real (non-padding) tokens the statistics were computed over.
        history: metric -> one list of per-block values per pass (e.g. per backward pass for
            ``grad_norm``); empty when nothing was recorded per pass.
    """

    def __init__(
        self,
        metrics: Mapping[str, Sequence[float]],
        names: Sequence[str],
        num_tokens: int = 0,
        history: Mapping[str, Sequence[Sequence[float]]] | None = None,
    ):
        self._names = tuple(str(n) for n in names)
        width = len(self._names)
        self._metrics: dict[str, tuple[float, ...]] = {}
        for metric, values in metrics.items():
            values = tuple(float(v) for v in values)
            if len(values) != width:
                raise ValueError(
                    f"metric {metric!r} has {len(values)} values but there are {width} layers; "
                    f"give one value per layer."
                )
            self._metrics[str(metric)] = values
        self._history = {
            str(metric): tuple(tuple(float(v) for v in row) for row in rows) for metric, rows in (history or {}).items()
        }
        self.num_tokens = int(num_tokens)

    # Mapping interface: values are handed out as fresh lists so the scores cannot be edited.
    def __getitem__(self, metric: str) -> list[float]:
        try:
            return list(self._metrics[metric])
        except KeyError:
            raise KeyError(f"no metric {metric!r}; available: {self.metrics}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._ordered())

    def __len__(self) -> int:
        return len(self._metrics)

    def _ordered(self) -> list[str]:
        known = [m for m in METRIC_ORDER if m in self._metrics]
        return known + sorted(m for m in self._metrics if m not in METRIC_ORDER)

    @property
    def metrics(self) -> list[str]:
        """The metric names, in display order."""
        return self._ordered()

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def num_layers(self) -> int:
        return len(self._names)

    @property
    def history(self) -> dict[str, list[list[float]]]:
        return {metric: [list(row) for row in rows] for metric, rows in self._history.items()}

    # Serialisation.
    def to_dict(self) -> dict:
        """Plain Python data (floats may be NaN); ``to_json`` makes it strict JSON."""
        return {
            "names": self.names,
            "num_tokens": self.num_tokens,
            "metrics": {metric: self[metric] for metric in self},
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "LayerScores":
        try:
            return cls(
                metrics={m: [_decode(v) for v in vals] for m, vals in data["metrics"].items()},
                names=data["names"],
                num_tokens=data.get("num_tokens", 0),
                history={m: [[_decode(v) for v in row] for row in rows] for m, rows in data.get("history", {}).items()},
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a LayerScores record ({err!r}); expected keys 'names' and 'metrics'.") from None

    def to_json(self, path: str) -> None:
        """Write strict JSON (NaN as null, infinities as "inf"/"-inf"); read back with ``from_json``."""
        data = self.to_dict()
        data["metrics"] = {m: [_encode(v) for v in vals] for m, vals in data["metrics"].items()}
        data["history"] = {m: [[_encode(v) for v in row] for row in rows] for m, rows in data["history"].items()}
        data["format"] = "laet_fast.LayerScores"
        data["version"] = _FORMAT_VERSION
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, allow_nan=False)
            handle.write("\n")

    @classmethod
    def from_json(cls, path: str) -> "LayerScores":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read layer scores from {path}: {err}") from None
        return cls.from_dict(data)

    # Display.
    def table(self, precision: int = 4) -> str:
        """A plain-text table: one row per layer, one column per metric, columns aligned."""
        metrics = self.metrics
        header = ["layer", "name"] + metrics
        rows = [
            [str(i), name] + [_format(self._metrics[m][i], precision) for m in metrics]
            for i, name in enumerate(self._names)
        ]
        widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
        # Index and numbers right-aligned, names left-aligned.
        def line(cells):
            return "  ".join(
                cell.ljust(widths[c]) if c == 1 else cell.rjust(widths[c]) for c, cell in enumerate(cells)
            ).rstrip()

        out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
        out.append(f"({self.num_layers} layers, {self.num_tokens} tokens)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"LayerScores(metrics={self.metrics}, num_layers={self.num_layers}, num_tokens={self.num_tokens})"

    def plot(self, path: str, title: str | None = None) -> None:
        """Write a PNG with one small panel per metric against the layer index.

        Needs matplotlib (``pip install matplotlib``); uses the non-interactive Agg backend.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("LayerScores.plot needs matplotlib: pip install matplotlib") from None

        metrics = self.metrics
        if not metrics:
            raise ValueError("LayerScores.plot: there are no metrics to plot.")
        cols = 2 if len(metrics) == 4 else min(3, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        # Figure (not pyplot) so that nothing global is touched and no window is ever opened.
        fig = Figure(figsize=(4.0 * cols, 2.8 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        index = list(range(self.num_layers))
        for k, metric in enumerate(metrics):
            ax = axes[k // cols][k % cols]
            ax.plot(index, self._metrics[metric], marker="o", markersize=3, linewidth=1.2)
            ax.set_title(metric.replace("_", " "))
            ax.set_xlabel("layer index")
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
            if self.num_layers <= 12:
                ax.set_xticks(index)
        for k in range(len(metrics), rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        fig.suptitle(title or f"Layer scores ({self.num_layers} layers, {self.num_tokens} tokens)")
        fig.savefig(path, dpi=100, format="png")


def _format(value: float, precision: int) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value != 0 and (abs(value) >= 10 ** 6 or abs(value) < 10 ** -(precision - 1)):
        return f"{value:.{precision - 1}e}"
    return f"{value:.{precision}f}"

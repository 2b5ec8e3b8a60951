"""Per-layer scores: a read-only mapping ``metric -> [one float per block]`` with I/O and a plot."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Iterator, Sequence

# Column order of the table and plot for the metrics LayerProbe produces; other metrics follow, sorted.
METRIC_ORDER = ("block_influence", "relative_change", "act_rms", "act_absmax", "grad_norm", "grad_norm_sq")
# Metrics plotted on a log axis when all their values are positive: activation magnitudes span several
# orders of magnitude across blocks (0.5 to 26,000 on SmolLM2), which a linear axis flattens to a line.
LOG_SCALE_METRICS = ("act_rms", "act_absmax")

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
        metadata: what was scored (model, data, batches, max length, laet_fast version, date...), as
            plain JSON values; saved by ``to_json``. Empty when not given.
    """

    def __init__(
        self,
        metrics: Mapping[str, Sequence[float]],
        names: Sequence[str],
        num_tokens: int = 0,
        history: Mapping[str, Sequence[Sequence[float]]] | None = None,
        metadata: Mapping[str, object] | None = None,
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
        self.metadata = dict(metadata or {})

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
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "LayerScores":
        try:
            return cls(
                metrics={m: [_decode(v) for v in vals] for m, vals in data["metrics"].items()},
                names=data["names"],
                num_tokens=data.get("num_tokens", 0),
                history={m: [[_decode(v) for v in row] for row in rows] for m, rows in data.get("history", {}).items()},
                metadata=data.get("metadata") or {},
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

    def plot(self, path: str, title: str | None = None, selection=None):
        """Write a figure with one small panel per metric against the layer index.

        The format follows the suffix of ``path`` (``.png``, ``.jpg``, ``.pdf``, ``.svg``... whatever
        matplotlib writes); a suffix it cannot write is refused. ``act_rms`` / ``act_absmax`` use a log
        axis when all their values are positive. The default title names the model and data from
        ``metadata`` when known. ``selection`` (a ``Selection`` or a list of block indices) marks the
        selected blocks in every panel. Needs matplotlib (``pip install matplotlib``), Agg backend.
        Returns the matplotlib ``Figure``.
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
        fmt = plot_format(path)
        marked = sorted(int(i) for i in (getattr(selection, "layers", selection) or ()))
        bad = [i for i in marked if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"LayerScores.plot: selection blocks {bad} are out of range for {self.num_layers} layers.")
        cols = 2 if len(metrics) == 4 else min(3, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        # Figure (not pyplot) so that nothing global is touched and no window is ever opened.
        fig = Figure(figsize=(4.0 * cols, 2.8 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        index = list(range(self.num_layers))
        for k, metric in enumerate(metrics):
            ax = axes[k // cols][k % cols]
            values = self._metrics[metric]
            ax.plot(index, values, marker="o", markersize=3, linewidth=1.2)
            if marked:
                ax.plot(marked, [values[i] for i in marked], linestyle="none", marker="o", markersize=7,
                        markerfacecolor="none", markeredgecolor="tab:red", label="selected")
                for i in marked:
                    ax.axvspan(i - 0.4, i + 0.4, color="tab:red", alpha=0.08, linewidth=0)
            finite = [v for v in values if math.isfinite(v)]
            log = metric in LOG_SCALE_METRICS and finite and min(finite) > 0
            if log:
                ax.set_yscale("log")
            ax.set_title(metric.replace("_", " ") + (" (log scale)" if log else ""))
            ax.set_xlabel("layer index")
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
            if self.num_layers <= 12:
                ax.set_xticks(index)
        if marked:
            axes[0][0].legend(loc="best", fontsize="small")
        for k in range(len(metrics), rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        fig.suptitle(title or self._default_title(marked))
        fig.savefig(path, dpi=100, format=fmt)
        return fig

    def _default_title(self, marked: list[int]) -> str:
        names = [f"{key} {os.path.basename(str(self.metadata[key]).rstrip('/'))}"
                 for key in ("model", "data") if self.metadata.get(key)]
        title = f"Layer scores ({self.num_layers} layers, {self.num_tokens} tokens)"
        if names:
            title = ", ".join(names) + f": {self.num_layers} layers, {self.num_tokens} tokens"
        if marked:
            title += f"; {len(marked)} selected (red)"
        return title


def plot_format(path: str) -> str:
    """The image format ``LayerScores.plot`` writes for ``path``, from its suffix; ValueError if matplotlib
    cannot write it. Needs matplotlib."""
    from matplotlib.figure import Figure

    suffix = os.path.splitext(str(path))[1].lower().lstrip(".")
    supported = Figure().canvas.get_supported_filetypes()
    if suffix not in supported:
        raise ValueError(f"cannot plot to {path}: {('suffix .' + suffix) if suffix else 'no suffix'} is not an "
                         f"image format matplotlib writes; use one of {', '.join('.' + s for s in sorted(supported))}.")
    return suffix


def _format(value: float, precision: int) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value != 0 and (abs(value) >= 10 ** 6 or abs(value) < 10 ** -(precision - 1)):
        return f"{value:.{precision - 1}e}"
    return f"{value:.{precision}f}"

"""Layer probes: one small classifier per layer, all L trained at once as one batched model.

A probe maps a layer's pooled embedding, standardized with the training part's per-feature mean and
std, to class logits: ``"linear"`` (H -> C) or ``"mlp"`` (H -> 128 -> 64 -> C with ReLU, LAET's
default). ``BatchedProbe`` holds the weights of all L probes stacked (``[L, in, out]``) and runs them
with one ``torch.baddbmm`` per linear layer, so a probe sweep costs a few large matrix products per
step instead of L Python loops of small ones. The loss summed over layers gives each probe exactly
the gradient of its own loss, and Adam is elementwise, so every probe trains exactly as it would alone
(``tests/test_embed_probes.py`` checks it).
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import encode_labels, stratified_folds, stratified_split
from ..scores import LayerScores

PROBES = ("linear", "mlp")
PROBE_METRICS = ("probe_acc", "probe_f1", "probe_loss")


@dataclass(frozen=True)
class ProbeConfig:
    """How the probes are built and trained.

    Attributes:
        probe: ``"linear"`` or ``"mlp"``.
        hidden: hidden widths of the MLP (LAET: 128, 64); unused by ``"linear"``.
        epochs, lr, batch_size, weight_decay: Adam on minibatches of examples, the same minibatches for
            every layer, drawn from ``seed``.
        seed: seeds each probe's initialisation (probe i from ``(seed, i)``) and the minibatch order.
    """

    probe: str = "mlp"
    hidden: tuple[int, ...] = (128, 64)
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; use one of {', '.join(PROBES)}.")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.probe == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ValueError(f"hidden={self.hidden!r}: an MLP probe needs positive hidden widths, e.g. (128, 64).")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"epochs, batch_size and lr must be positive; got {self.epochs}, {self.batch_size}, "
                             f"{self.lr}.")

    def sizes(self, in_features: int, num_classes: int) -> list[int]:
        """Widths of the probe's layers, input to output."""
        return [in_features, *(self.hidden if self.probe == "mlp" else ()), num_classes]


def _layer_seed(seed: int, layer: int) -> int:
    return (int(seed) * 1_000_003 + int(layer)) % (2 ** 63)


class ProbeHead(nn.Module):
    """One probe on its own: standardize pooled features, then an MLP: float [B, H] -> logits float32 [B, C].

    ``mean`` / ``std`` [H] come from the training features (LAET's probe standardization): block outputs
    differ in scale by orders of magnitude between blocks, so the MLP sees unit-scale inputs. ``hidden``
    are the MLP's hidden widths (``()``: a linear probe). ``BatchedProbe.head`` makes one from a trained
    probe; LAET's trainer (``laet_fast.train``) puts one on each selected block and saves it by ``spec``.
    """

    def __init__(self, hidden_size: int, num_classes: int, hidden: Sequence[int] = (),
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size) if mean is None else mean.detach().float().clone())
        self.register_buffer("std", torch.ones(hidden_size) if std is None else std.detach().float().clone())
        self.hidden = tuple(int(h) for h in hidden)
        dims = (hidden_size, *self.hidden, num_classes)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Linear(a, b)] if i == len(dims) - 2 else [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)

    def spec(self) -> dict:
        """The constructor's sizes, as JSON: ``ProbeHead.from_spec(spec)`` rebuilds the module (weights apart)."""
        return {"hidden_size": self.mean.numel(), "num_classes": self.mlp[-1].out_features, "hidden": list(self.hidden)}

    @classmethod
    def from_spec(cls, spec: dict) -> "ProbeHead":
        return cls(spec["hidden_size"], spec["num_classes"], tuple(spec["hidden"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(((x.float() - self.mean) / self.std).to(self.mlp[0].weight.dtype)).float()


class BatchedProbe(nn.Module):
    """L probes over L layers' features, trained and run together.

    Args:
        num_layers, in_features, num_classes: L, H and C.
        config: the probe's shape and seed (``ProbeConfig``); probe i is initialised like ``nn.Linear``
            (uniform in +-1/sqrt(fan_in)) from a generator seeded with ``(config.seed, i)``, so it does
            not depend on L.

    Buffers ``mean`` and ``std`` (float32 ``[L, H]``) standardize the raw features; set them from the
    training part with ``fit_standardization``.
    """

    def __init__(self, num_layers: int, in_features: int, num_classes: int, config: ProbeConfig = ProbeConfig()):
        super().__init__()
        self.config = config
        self.num_layers, self.in_features, self.num_classes = num_layers, in_features, num_classes
        sizes = config.sizes(in_features, num_classes)
        weights = [torch.empty(num_layers, a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        biases = [torch.empty(num_layers, b) for b in sizes[1:]]
        for layer in range(num_layers):
            generator = torch.Generator().manual_seed(_layer_seed(config.seed, layer))
            for w, b in zip(weights, biases):
                bound = 1.0 / math.sqrt(w.shape[1])
                w[layer].uniform_(-bound, bound, generator=generator)
                b[layer].uniform_(-bound, bound, generator=generator)
        self.weights = nn.ParameterList(weights)  # [L, in, out] each
        self.biases = nn.ParameterList(biases)  # [L, out] each
        self.register_buffer("mean", torch.zeros(num_layers, in_features))
        self.register_buffer("std", torch.ones(num_layers, in_features))

    @torch.no_grad()
    def fit_standardization(self, features: torch.Tensor) -> None:
        """Set ``mean``/``std`` from ``features`` [N, L, H] (the training part only); constant features get std 1."""
        mean = features.mean(0, dtype=torch.float64)
        std = features.to(torch.float64).std(0, unbiased=False)
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features ``[N, L, H]`` (any float dtype) -> logits float32 ``[N, L, C]``."""
        if x.dim() != 3 or x.shape[1:] != (self.num_layers, self.in_features):
            raise ValueError(f"BatchedProbe expects features [N, {self.num_layers}, {self.in_features}]; got "
                             f"{tuple(x.shape)}.")
        z = ((x.to(self.mean.dtype) - self.mean) / self.std).transpose(0, 1)  # [L, N, H]
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = torch.baddbmm(b[:, None, :], z, w)
            if k < last:
                z = F.relu(z)
        return z.transpose(0, 1)

    def head(self, i: int) -> ProbeHead:
        """A standalone, trainable copy of probe ``i``: raw features ``[B, H]`` -> logits ``[B, C]``."""
        if not 0 <= i < self.num_layers:
            raise ValueError(f"probe index {i} is out of range 0..{self.num_layers - 1}.")
        hidden = self.config.hidden if self.config.probe == "mlp" else ()
        head = ProbeHead(self.in_features, self.num_classes, hidden, self.mean[i], self.std[i]).to(self.mean.device)
        linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for linear, w, b in zip(linears, self.weights, self.biases):
                linear.weight.copy_(w[i].T)
                linear.bias.copy_(b[i])
        return head

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over layers of each probe's mean cross-entropy: probe i's gradient is that of its own loss."""
        logits = self(x)  # [N, L, C]
        per_example = F.cross_entropy(logits.permute(0, 2, 1), labels[:, None].expand(-1, self.num_layers),
                                      reduction="none")  # [N, L]
        return per_example.mean(0).sum()

    def fit(self, x: torch.Tensor, labels: torch.Tensor, bar=None) -> "BatchedProbe":
        """Standardize from ``x`` and train every probe on (``x`` [N, L, H], ``labels`` int64 [N]); ``bar`` (a
        tqdm bar), when given, advances once per epoch."""
        config = self.config
        self.fit_standardization(x)
        optimizer = torch.optim.Adam(self.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        self.train()
        for _ in range(config.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), config.batch_size):
                rows = order[start:start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                self.loss(x[rows], labels[rows]).backward()
                optimizer.step()
            if bar is not None:
                bar.update(1)
        self.eval()
        return self

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer ``probe_acc``, ``probe_f1`` (support-weighted F1, as LAET reports) and ``probe_loss``
        (mean cross-entropy), each float64 ``[L]``."""
        logits = self(x)
        loss = F.cross_entropy(logits.permute(0, 2, 1), labels[:, None].expand(-1, self.num_layers),
                               reduction="none").mean(0)
        predicted = logits.argmax(-1)  # [N, L]
        return {"probe_acc": (predicted == labels[:, None]).double().mean(0),
                "probe_f1": weighted_f1(predicted, labels, self.num_classes),
                "probe_loss": loss.double()}


def weighted_f1(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Support-weighted F1 of each column of ``predicted`` [N, L] against ``labels`` [N]: float64 [L].

    Per class c: F1_c = 2 tp / (2 tp + fp + fn) (0 when the class is neither present nor predicted);
    the result is sum_c support_c F1_c / N.
    """
    truth = F.one_hot(labels, num_classes).double()[:, None, :]  # [N, 1, C]
    guess = F.one_hot(predicted, num_classes).double()  # [N, L, C]
    tp = (truth * guess).sum(0)
    fp = ((1 - truth) * guess).sum(0)
    fn = (truth * (1 - guess)).sum(0)
    denominator = 2 * tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))  # [L, C]
    support = truth[:, 0].sum(0)  # [C]
    return (f1 * support).sum(1) / support.sum()


def check_features(emb: torch.Tensor, what: str = "embeddings") -> torch.Tensor:
    """``emb`` as float32 [N, L, H]; ValueError for a wrong shape, no examples, or NaN/inf."""
    if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or not emb.dtype.is_floating_point:
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"{what} must be a float tensor [N, L, H] (from layer_embeddings); got {shape}.")
    if emb.shape[0] == 0 or emb.shape[1] == 0 or emb.shape[2] == 0:
        raise ValueError(f"{what} are empty ({tuple(emb.shape)}); embed at least one example first.")
    features = emb.detach().to("cpu", torch.float32)
    bad = ~torch.isfinite(features).all(2)
    if bad.any():
        example, layer = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"{what} hold NaN or inf ({int(bad.sum())} vectors, first: example {example}, layer "
                         f"{layer}); re-extract them in float32 or drop those examples.")
    return features


def _layer_names(emb: torch.Tensor) -> list[str]:
    names = getattr(emb, "names", None)
    return list(names) if names else [f"layer.{i}" for i in range(emb.shape[1])]


def probe_layers(emb: torch.Tensor, labels, *, probe: str = "mlp", hidden: Sequence[int] = (128, 64),
                 val_fraction: float = 0.2, folds: int | None = None, seed: int = 0, epochs: int = 20,
                 lr: float = 1e-3, batch_size: int = 64, weight_decay: float = 0.0, return_probes: bool = False,
                 progress: bool = False):
    """Train a probe per layer, all at once, and score each layer on held-out examples.

    Args:
        emb: float ``[N, L, H]`` pooled embeddings (``layer_embeddings``'s output).
        labels: N labels, strings or integers (``encode_labels``).
        probe, hidden, epochs, lr, batch_size, weight_decay, seed: see ``ProbeConfig``.
        val_fraction: share of each class held out for validation (one seeded stratified split).
        folds: instead, k-fold stratified cross-validation; the metrics are the means over folds,
            with ``*_std`` (sample std over folds) beside them.
        return_probes: also return the ``BatchedProbe``: the one trained on the split's training part,
            or with folds one refit on every example.
        progress: a progress bar on stderr over the training epochs (of every fold, and of the refit).

    Features are standardized with the mean and std of the training part only.

    Returns:
        ``LayerScores`` with ``probe_acc``, ``probe_f1`` (weighted) and ``probe_loss`` per layer (and their
        ``_std`` with folds); ``metadata`` records the classes and the settings. With ``return_probes``,
        ``(scores, probe)``.

    Raises:
        ValueError: empty or non-finite embeddings, a label count other than N, a single class, an unknown
            probe, or bad split settings.
    """
    config = ProbeConfig(probe=probe, hidden=tuple(hidden), epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, seed=seed)
    features = check_features(emb)
    ids, classes = encode_labels(labels, num_examples=features.shape[0])
    if folds is None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.2).")
    splits = [stratified_split(ids, val_fraction, seed)] if folds is None else stratified_folds(ids, folds, seed)
    ids = torch.tensor(ids, dtype=torch.long)
    splits = [(torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long)) for train, val in splits]
    num_layers, width = features.shape[1], features.shape[2]
    per_split: dict[str, list[list[float]]] = {m: [] for m in PROBE_METRICS}
    trained = None
    fits = len(splits) + (1 if return_probes and folds is not None else 0)
    bar = tqdm(total=fits * epochs, desc=f"training {num_layers} probes", unit="epoch", file=sys.stderr,
               disable=not progress)
    for train, val in splits:
        trained = BatchedProbe(num_layers, width, len(classes), config).fit(features[train], ids[train], bar)
        for metric, values in trained.evaluate(features[val], ids[val]).items():
            per_split[metric].append(values.tolist())
    metrics = {m: [statistics.fmean(column) for column in zip(*rows)] for m, rows in per_split.items()}
    if folds is not None:
        metrics.update({f"{m}_std": [statistics.stdev(column) for column in zip(*rows)]
                        for m, rows in per_split.items()})
    metadata = {"method": "layer probes", "classes": classes, **asdict(config), "hidden": list(config.hidden),
                "examples": features.shape[0], "fingerprint": getattr(emb, "fingerprint", None),
                "pooling": getattr(emb, "pooling", None)}
    metadata.update({"val_fraction": val_fraction} if folds is None else {"folds": folds})
    scores = LayerScores(metrics, _layer_names(emb), metadata=metadata)
    if return_probes and folds is not None:
        trained = BatchedProbe(num_layers, width, len(classes), config).fit(features, ids, bar)
    bar.close()
    return (scores, trained) if return_probes else scores

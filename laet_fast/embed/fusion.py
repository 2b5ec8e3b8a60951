"""``FusionClassifier``: one trained head over chosen layers of one model, or of several, frozen.

Each chosen layer ``(model_index, layer)`` contributes its pooled embedding, standardized with the
training part's statistics. The fusion operator combines them:

* ``"concat"``: the vectors side by side;
* ``"mean"``: each projected to a common width by its own linear map, then averaged;
* ``"weighted"``: the same projections, averaged with learned softmax weights (one per layer);
* ``"gated"``: the same projections, weighted per example by a softmax gate computed from them all.

An MLP head maps the result to class logits. Only the head (projections and gate included) trains.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import encode_labels, stratified_split
from .probes import BatchedProbe, ProbeConfig, check_features

FUSIONS = ("concat", "mean", "weighted", "gated")
_FORMAT = "laet_fast.FusionClassifier"
_VERSION = 1
_CONFIG_FILE, _WEIGHTS_FILE = "fusion.json", "fusion.safetensors"


def _as_sources(embeddings) -> list[torch.Tensor]:
    """A list of [N, L_m, H_m] tensors, one per model; refused unless they provably hold the same examples
    in the same order (equal ``LayerEmbeddings.fingerprint``)."""
    sources = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
    if not sources:
        raise ValueError("FusionClassifier got no embeddings; pass a [N, L, H] tensor or a list of them.")
    features = [check_features(s, f"embeddings of model {m}") for m, s in enumerate(sources)]
    counts = {f.shape[0] for f in features}
    if len(counts) != 1:
        raise ValueError(f"the models' embeddings cover different numbers of examples ({sorted(counts)}); embed "
                         f"the same texts, in the same order, with every model.")
    if len(sources) > 1:
        prints = [getattr(s, "fingerprint", None) for s in sources]
        if any(p is None for p in prints):
            raise ValueError("fusing several models needs each one's layer_embeddings output, made from a list of "
                             "texts: it carries a fingerprint of the texts and their order (sliced, shuffled or "
                             "pre-tokenized embeddings have none). Embed the same list of texts with each model.")
        if len(set(prints)) != 1:
            raise ValueError("the models' embeddings were made from different texts or a different order "
                             "(their fingerprints differ); embed the same list of texts with every model.")
    return features


class _FusionHead(nn.Module):
    """Standardize each chosen layer's vector, fuse, and classify: list of [B, H_s] -> logits [B, C]."""

    def __init__(self, widths: Sequence[int], num_classes: int, fusion: str, hidden: int, proj_dim: int):
        super().__init__()
        self.fusion = fusion
        for s, width in enumerate(widths):
            self.register_buffer(f"mean_{s}", torch.zeros(width))
            self.register_buffer(f"std_{s}", torch.ones(width))
        self.num_sources = len(widths)
        if fusion == "concat":
            fused = sum(widths)
        else:
            self.projections = nn.ModuleList(nn.Linear(w, proj_dim) for w in widths)
            fused = proj_dim
            if fusion == "weighted":
                self.layer_logits = nn.Parameter(torch.zeros(len(widths)))
            elif fusion == "gated":
                self.gate = nn.Linear(proj_dim * len(widths), len(widths))
        self.mlp = nn.Sequential(nn.Linear(fused, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    @torch.no_grad()
    def fit_standardization(self, parts: Sequence[torch.Tensor]) -> None:
        for s, part in enumerate(parts):
            std = part.double().std(0, unbiased=False)
            getattr(self, f"mean_{s}").copy_(part.double().mean(0))
            getattr(self, f"std_{s}").copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        z = [(p - getattr(self, f"mean_{s}")) / getattr(self, f"std_{s}") for s, p in enumerate(parts)]
        if self.fusion == "concat":
            return self.mlp(torch.cat(z, dim=1))
        projected = torch.stack([proj(v) for proj, v in zip(self.projections, z)], dim=1)  # [B, S, D]
        if self.fusion == "mean":
            weights = torch.full(projected.shape[:2], 1.0 / self.num_sources, device=projected.device)
        elif self.fusion == "weighted":
            weights = torch.softmax(self.layer_logits, 0).expand(projected.shape[0], -1)
        else:
            weights = torch.softmax(self.gate(projected.flatten(1)), dim=1)
        return self.mlp((weights[:, :, None] * projected).sum(1))


class FusionClassifier:
    """A classifier over chosen layers of one or several models' pooled embeddings.

    Args:
        layers: ``"auto"`` (probe every layer on a stratified validation split of the training examples,
            rank the ``(model, layer)`` pairs by validation accuracy, and keep the top k, k in
            ``1..k_max`` chosen by the fused head's validation accuracy; the head is then refit on every
            training example), or a list of ``(model_index, layer)`` pairs (a layer index counts the
            columns of that model's embeddings).
        fusion: ``"concat"``, ``"mean"``, ``"weighted"`` or ``"gated"`` (module docstring).
        hidden: width of the MLP head's hidden layer. proj_dim: common width of the projections (all but
            concat).
        k_max, val_fraction: the auto search; ``probe`` is the probe that ranks the layers.
        epochs, lr, batch_size, weight_decay, seed: Adam on seeded minibatches.

    After ``fit``: ``layers_`` (the chosen pairs), ``classes_`` and, for ``"auto"``, ``search_`` (each
    candidate's probe accuracy and each k's validation accuracy).
    """

    def __init__(self, layers="auto", fusion: str = "concat", *, hidden: int = 256, proj_dim: int = 256,
                 k_max: int = 5, val_fraction: float = 0.2, probe: str = "linear", epochs: int = 30,
                 lr: float = 1e-3, batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0):
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}.")
        if layers != "auto":
            layers = [tuple(int(v) for v in pair) for pair in layers]
            if not layers or any(len(pair) != 2 for pair in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"layers={layers!r} must be 'auto' or distinct (model_index, layer) pairs.")
        if k_max < 1:
            raise ValueError(f"k_max={k_max} must be at least 1.")
        self.layers, self.fusion = layers, fusion
        self.settings = dict(hidden=int(hidden), proj_dim=int(proj_dim), k_max=int(k_max),
                             val_fraction=float(val_fraction), probe=probe, epochs=int(epochs), lr=float(lr),
                             batch_size=int(batch_size), weight_decay=float(weight_decay), seed=int(seed))
        self.layers_: list[tuple[int, int]] | None = None
        self.classes_: list | None = None
        self.shapes_: list[tuple[int, int]] | None = None
        self.search_: dict | None = None
        self.head_: _FusionHead | None = None

    # Training.
    def _parts(self, sources: list[torch.Tensor], pairs, rows=None) -> list[torch.Tensor]:
        return [sources[m][:, layer] if rows is None else sources[m][rows, layer] for m, layer in pairs]

    def _train_head(self, parts: list[torch.Tensor], ids: torch.Tensor, num_classes: int) -> _FusionHead:
        s = self.settings
        with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the global RNG alone
            torch.manual_seed(s["seed"])
            head = _FusionHead([p.shape[1] for p in parts], num_classes, self.fusion, s["hidden"], s["proj_dim"])
        head.fit_standardization(parts)
        optimizer = torch.optim.AdamW(head.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
        generator = torch.Generator().manual_seed(s["seed"])
        head.train()
        for _ in range(s["epochs"]):
            order = torch.randperm(len(ids), generator=generator)
            for start in range(0, len(ids), s["batch_size"]):
                rows = order[start:start + s["batch_size"]]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(head([p[rows] for p in parts]), ids[rows]).backward()
                optimizer.step()
        return head.eval()

    def _auto_layers(self, sources, ids, num_classes) -> list[tuple[int, int]]:
        s = self.settings
        train, val = (torch.tensor(rows, dtype=torch.long) for rows in stratified_split(ids, s["val_fraction"],
                                                                                          s["seed"]))
        config = ProbeConfig(probe=s["probe"], epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
                             seed=s["seed"])
        ranked = []
        for m, source in enumerate(sources):
            probe = BatchedProbe(source.shape[1], source.shape[2], num_classes, config).fit(source[train], ids[train])
            metrics = probe.evaluate(source[val], ids[val])
            ranked += [((m, layer), float(metrics["probe_acc"][layer]), float(metrics["probe_f1"][layer]))
                       for layer in range(source.shape[1])]
        ranked.sort(key=lambda item: (-item[1], -item[2], item[0]))
        by_k = {}
        for k in range(1, min(s["k_max"], len(ranked)) + 1):
            pairs = [pair for pair, _, _ in ranked[:k]]
            head = self._train_head(self._parts(sources, pairs, train), ids[train], num_classes)
            with torch.no_grad():
                predicted = head(self._parts(sources, pairs, val)).argmax(1)
            by_k[str(k)] = float((predicted == ids[val]).double().mean())
        best_k = int(max(by_k, key=lambda k: (by_k[k], -int(k))))  # ties go to fewer layers
        self.search_ = {"candidates": [{"model": p[0], "layer": p[1], "probe_acc": a, "probe_f1": f}
                                       for p, a, f in ranked],
                        "val_acc_by_k": by_k, "k": best_k}
        return [pair for pair, _, _ in ranked[:best_k]]

    def fit(self, embeddings, labels) -> "FusionClassifier":
        """Train on ``embeddings`` (a [N, L, H] tensor or a list, one per model, of the same N examples) and N
        labels (strings or integers)."""
        sources = _as_sources(embeddings)
        ids, classes = encode_labels(labels, num_examples=sources[0].shape[0])
        ids = torch.tensor(ids, dtype=torch.long)
        self.classes_ = classes
        self.shapes_ = [(s.shape[1], s.shape[2]) for s in sources]
        pairs = self._auto_layers(sources, ids, len(classes)) if self.layers == "auto" else list(self.layers)
        self._check_pairs(pairs)
        self.layers_ = pairs
        self.head_ = self._train_head(self._parts(sources, pairs), ids, len(classes))
        return self

    def _check_pairs(self, pairs) -> None:
        for m, layer in pairs:
            if not 0 <= m < len(self.shapes_) or not 0 <= layer < self.shapes_[m][0]:
                raise ValueError(f"layer pair ({m}, {layer}) is out of range: there are {len(self.shapes_)} models "
                                 f"with {[s[0] for s in self.shapes_]} layers.")

    # Inference.
    def _sources_for_inference(self, embeddings) -> list[torch.Tensor]:
        if self.head_ is None:
            raise ValueError("this FusionClassifier is not fitted yet; call fit(embeddings, labels) first.")
        sources = _as_sources(embeddings)
        shapes = [(s.shape[1], s.shape[2]) for s in sources]
        if shapes != self.shapes_:
            raise ValueError(f"the embeddings have (layers, hidden) {shapes} per model but the classifier was fit on "
                             f"{self.shapes_}; embed with the same models, layers and in the same model order.")
        return sources

    @torch.no_grad()
    def predict_proba(self, embeddings) -> torch.Tensor:
        """Class probabilities float32 [N, C], columns in ``classes_`` order."""
        sources = self._sources_for_inference(embeddings)
        return torch.softmax(self.head_(self._parts(sources, self.layers_)), dim=1)

    def predict(self, embeddings) -> list:
        """The predicted label of each example (from ``classes_``: the labels given to ``fit``)."""
        return [self.classes_[i] for i in self.predict_proba(embeddings).argmax(1).tolist()]

    def score(self, embeddings, labels) -> float:
        """Accuracy on (embeddings, labels); a label not seen in ``fit`` is refused."""
        predicted = self.predict(embeddings)
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        if len(labels) != len(predicted):
            raise ValueError(f"got {len(labels)} labels for {len(predicted)} examples.")
        unknown = sorted({repr(v) for v in labels if v not in self.classes_})
        if unknown:
            raise ValueError(f"labels {', '.join(unknown)} were not seen in fit (classes: {self.classes_}).")
        return sum(p == t for p, t in zip(predicted, labels)) / len(labels)

    # Persistence.
    def save(self, folder: str) -> None:
        """Write ``fusion.json`` (settings, chosen layers, classes) and ``fusion.safetensors`` (the head)."""
        from safetensors.torch import save_file

        if self.head_ is None:
            raise ValueError("nothing to save: call fit first.")
        os.makedirs(folder, exist_ok=True)
        record = {"format": _FORMAT, "version": _VERSION, "fusion": self.fusion,
                  "layers": "auto" if self.layers == "auto" else [list(p) for p in self.layers],
                  "settings": self.settings, "layers_": [list(p) for p in self.layers_], "classes": self.classes_,
                  "shapes": [list(s) for s in self.shapes_], "search": self.search_}
        with open(os.path.join(folder, _CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
            handle.write("\n")
        save_file({k: v.contiguous() for k, v in self.head_.state_dict().items()},
                  os.path.join(folder, _WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: str) -> "FusionClassifier":
        """Read a classifier written by ``save``; ValueError when the folder holds none."""
        from safetensors.torch import load_file

        try:
            with open(os.path.join(folder, _CONFIG_FILE), encoding="utf-8") as handle:
                record = json.load(handle)
            state = load_file(os.path.join(folder, _WEIGHTS_FILE))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{folder} holds no saved FusionClassifier ({err}).") from None
        if record.get("format") != _FORMAT:
            raise ValueError(f"{folder}/{_CONFIG_FILE} is not a FusionClassifier record.")
        model = cls(record["layers"], record["fusion"], **record["settings"])
        model.classes_, model.search_ = record["classes"], record["search"]
        model.shapes_ = [tuple(s) for s in record["shapes"]]
        model.layers_ = [tuple(p) for p in record["layers_"]]
        s = model.settings
        model.head_ = _FusionHead([model.shapes_[m][1] for m, _ in model.layers_], len(model.classes_), model.fusion,
                                  s["hidden"], s["proj_dim"])
        model.head_.load_state_dict(state)
        model.head_.eval()
        return model

"""Layer-selection methods shared by laet_fast.Trainer and LaetCallback: score the blocks, then choose.

A method is one of :data:`METHODS` or an explicit list of block indices:

========================  ==========================================================================
``laet``                  LAET: a probe per block on its pooled output, trained on the labels; the
                          blocks whose probes classify best (``probe_acc``) are chosen, and their
                          probes become the training heads. Needs labels.
``laet-cost``             LAET's kept blocks, cut to the cheapest set to train that still holds the
                          best probe's block (``laet_fast.cost.laet_cost_selection``); a budget
                          (``budget_s`` / ``budget_gb``) or ``k`` caps it.
``grad_norm``             IR-Tuning: per-block gradient norms of the next-token loss, sorted and cut
                          where var(low) + var(high) is smallest (``splits=`` splits again); with
                          ``k`` the k largest instead.
``block_influence``       ShortGPT's 1 - cos(block input, block output): the k blocks that change the
                          hidden state most.
``relative_change``       ``|out - in| / |in|``: the k largest.
``last``                  the last k blocks (freeze-tuning baseline); no scoring.
``random``                k blocks drawn with ``seed`` (LISA-like); no scoring.
``all``                   every block: full fine-tuning of the blocks, the baseline.
========================  ==========================================================================
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

from .names import METHODS, METRIC_OF, PROBE_METHODS, RESELECTABLE, SCORE_FREE
from .selection import Selection, laet_scores, select_layers

if TYPE_CHECKING:  # torch is imported where it is used, so that the command line's --help stays light
    import torch
    import torch.nn as nn

    from .scores import LayerScores

# LAET's probes are scored by stratified k-fold cross-validation, so that each block's accuracy comes with its
# spread across folds (``probe_spread``); a class with fewer examples than this sets the number of folds.
PROBE_FOLDS = 5
# How many training examples LAET's probes learn from by default (all of them when there are fewer).
PROBE_EXAMPLES = 1000


def parse_method(method) -> str | tuple[int, ...]:
    """A method name from :data:`METHODS`, or a tuple of block indices from a list or ``"3,7,12"``."""
    if isinstance(method, str):
        name = method.strip().lower()
        if name in METHODS:
            return name
        parts = [p.strip() for p in name.split(",") if p.strip()]
        if parts and all(p.lstrip("-").isdigit() for p in parts):
            return tuple(int(p) for p in parts)
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}, or list blocks "
                         f"as '3,7,12'.")
    if isinstance(method, Sequence) and method and all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in method):
        return tuple(method)
    raise ValueError(f"method must be one of {', '.join(METHODS)} or a list of block indices, got {method!r}.")


def score_layers(
    model: "nn.Module",
    batches: Iterable[dict],
    method,
    *,
    labels: "Sequence | torch.Tensor | None" = None,
    layers: str | None = None,
    return_probes: bool = False,
    seed: int = 0,
    own_loss: bool = False,
    progress: bool = False,
    probe_examples: int | None = None,
    **probe_kwargs,
):
    """Score every block of ``model`` for ``method`` on ``batches``; None for score-free methods.

    Args:
        model: a transformers model (its weights are not changed; gradients are not stored).
        batches: dicts with ``input_ids`` and ``attention_mask`` (int64 [B, T], 1 = real token).
        method: see :data:`METHODS` (an explicit block list needs no scores).
        labels: ``laet`` / ``laet-cost`` only: one class id per row of ``batches``, in order (LongTensor [N] or
            list).
        layers: dotted path of the block list when it is not found automatically.
        return_probes: ``laet`` / ``laet-cost`` only: return ``(scores, BatchedProbe)``, the probes being the heads.
        seed: ``laet`` / ``laet-cost`` only: seed of the probes' folds and initialisation.
        own_loss: ``grad_norm`` only: measure the gradient of the loss the model computes on each batch as it
            is given (every key, its ``labels`` included: one class id per row for a classification model, -100
            on the tokens a completion-only loss skips), as a ``transformers.Trainer`` trains on it. Default: the
            next-token loss on every real token, from ``input_ids`` and ``attention_mask`` alone.
        progress: a progress bar on stderr over the texts (``laet``) or batches (other methods) scored.
        probe_examples: ``laet`` / ``laet-cost`` only: the probes learn from the first this many rows of
            ``batches`` (of every rank's, gathered in global order under several processes); None: all rows.
        **probe_kwargs: ``laet`` / ``laet-cost`` only: passed to ``laet_fast.embed.probe_layers`` (``hidden``,
            ``epochs``...). The probes are cross-validated on ``PROBE_FOLDS`` stratified folds (fewer when a
            class has fewer examples; one split when a class has one), so ``probe_acc_std`` gives their spread.

    Returns:
        A ``LayerScores`` (one value per block for each metric), ``(LayerScores, BatchedProbe)`` with
        ``return_probes`` for ``laet`` / ``laet-cost``, or None for ``last``, ``random``, ``all`` and explicit blocks.
    """
    import torch

    method = parse_method(method)
    if not isinstance(method, str) or method in SCORE_FREE:
        return None
    batches = list(batches)
    if not batches:
        raise ValueError("score_layers: no batches to score on; give at least one batch of text.")
    if method in PROBE_METHODS:
        return _score_laet(model, batches, labels, layers, return_probes, seed, progress, probe_examples,
                           probe_kwargs)
    import sys

    from tqdm.auto import tqdm

    from .apply import suspend_backward_cut
    from .probe import LayerProbe

    grad_norms = method == "grad_norm"
    was_training = model.training
    trainable = {p for p in model.parameters() if p.requires_grad}
    model.requires_grad_(False)  # gradient norms are measured without storing any weight gradient
    try:
        with LayerProbe(model, layers=layers, grad_norms=grad_norms) as probe, suspend_backward_cut(model), \
                torch.set_grad_enabled(grad_norms):
            bar = tqdm(batches, desc=f"scoring ({method})", unit="batch", file=sys.stderr, disable=not progress)
            for batch in bar:
                ids, mask = batch["input_ids"], batch["attention_mask"]
                if grad_norms and own_loss:
                    loss = model(**batch).loss  # called as a transformers.Trainer calls it
                    if loss is None:
                        raise ValueError(f"grad_norm scores the gradient of the model's own loss, but the model "
                                         f"computed none on a batch of {', '.join(sorted(batch))}; give the "
                                         f"batches the labels it trains on ('labels').")
                    loss.backward()
                elif grad_norms:
                    target = ids.masked_fill(mask == 0, -100)
                    model(input_ids=ids, attention_mask=mask, labels=target, use_cache=False).loss.backward()
                else:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for param in trainable:
            param.requires_grad_(True)
        model.train(was_training)
    return probe.scores()


def _score_laet(model, batches, labels, layers, return_probes, seed, progress, probe_examples, probe_kwargs):
    import torch

    try:
        from .embed import layer_embeddings, probe_layers
    except ImportError:
        raise ValueError("method 'laet' needs laet_fast.embed (layer embeddings and probes), which this "
                         "install lacks; choose another method.") from None
    if labels is None:
        raise ValueError("method 'laet' trains a probe per block on labels; pass labels= (one per text).")
    labels = torch.as_tensor(labels, dtype=torch.long)
    rows = sum(int(b["input_ids"].shape[0]) for b in batches)
    if labels.numel() != rows:
        raise ValueError(f"score_layers: {labels.numel()} labels for {rows} texts; give one label per text.")
    emb = layer_embeddings(model, batches, layers=layers, progress=progress)
    from .distributed import is_distributed

    if is_distributed():
        emb, labels = gather_batch_rows(emb.as_subclass(torch.Tensor), labels, batches)
    if probe_examples is not None and len(labels) > probe_examples:
        emb, labels = emb[:probe_examples], labels[:probe_examples]
    counts = torch.bincount(labels)
    smallest_class = int(counts[counts > 0].min())
    folds = min(PROBE_FOLDS, smallest_class) if smallest_class >= 2 else None
    return probe_layers(emb, labels, seed=seed, folds=folds, return_probes=return_probes, progress=progress,
                        **probe_kwargs)


def gather_batch_rows(features: "torch.Tensor", labels: "torch.Tensor", batches: list[dict]):
    """Every rank's rows of each scoring batch, gathered batch by batch in rank order, on every rank.

    Args:
        features: float ``[N, ...]``, this rank's rows of ``batches`` in order (N = their total rows).
        labels: int64 ``[N]``, one per row.
        batches: this rank's batches (only their row counts are read).

    Returns:
        ``(features, labels)`` of the global batches. When rank ``r`` holds the ``r``-th slice of each
        global batch (the thin trainer's and the Trainer's sharding), rank order within a batch is the
        global batch's own order, so the rows are those one process reads, in the same order. Ranks with
        fewer batches than others set the count: all gather the same number of times.
    """
    import torch

    from .distributed import gather_rows

    count = int(gather_rows(torch.tensor([len(batches)])).min())
    rows, gathered_labels, start = [], [], 0
    for batch in batches[:count]:
        n = int(batch["input_ids"].shape[0])
        rows.append(gather_rows(features[start:start + n]))
        gathered_labels.append(gather_rows(labels[start:start + n].cpu()))
        start += n
    return torch.cat(rows), torch.cat(gathered_labels)


def probe_spread(scores: "LayerScores", margin: float = 0.5) -> dict | None:
    """How far apart LAET's probes tell the blocks, from their cross-validated accuracies.

    Args:
        scores: ``score_layers``' LAET scores, with ``probe_acc`` and ``probe_acc_std`` (mean and sample std
            over the folds, per block) and ``metadata["folds"]``.
        margin: LAET's margin (``laet_keep``).

    Returns:
        None without folds (one split has no spread); else ``{"folds", "examples", "mean", "std"`` (per block),
        ``"uncertainty"``, ``"gap"``, ``"too_wide"}``.
    """
    import math
    import statistics

    folds = scores.metadata.get("folds") if scores is not None else None
    if not folds or "probe_acc_std" not in scores:
        return None
    mean, std = [float(v) for v in scores["probe_acc"]], [float(v) for v in scores["probe_acc_std"]]
    finite = [i for i in range(len(mean)) if math.isfinite(mean[i]) and math.isfinite(std[i])]
    # Too wide: LAET drops a block only when another beats its mean probe accuracy by the gap, margin x the
    # population sd of the blocks' means. A block's mean over k folds is uncertain by about std / sqrt(k) (its
    # standard error; the median over blocks, so that one odd block does not decide). When that uncertainty is
    # as large as the gap, which blocks are kept or dropped follows the sample of examples, not the blocks.
    uncertainty = statistics.median(std[i] for i in finite) / math.sqrt(folds)
    gap = margin * statistics.pstdev(mean[i] for i in finite)
    return {"folds": folds, "examples": scores.metadata.get("examples"), "mean": mean, "std": std,
            "uncertainty": uncertainty, "gap": gap, "too_wide": uncertainty >= gap}


def choose_blocks(model: "nn.Module", batches: Iterable[dict], method, *, k: int | None = None,
                  labels: "Sequence | torch.Tensor | None" = None, layers: str | None = None, seed: int = 0,
                  own_loss: bool = False, progress: bool = False, probe_examples: int | None = None,
                  keep_probes: bool = False, select_kwargs: dict | None = None, **probe_kwargs):
    """Score the blocks of ``model`` on ``batches`` by ``method``, then choose: the one way laet_fast.Trainer and
    LaetCallback choose blocks.

    Args:
        model, batches, method, labels, layers, seed, own_loss, progress, probe_examples, **probe_kwargs: as
            ``score_layers`` takes them (``seed`` is the choice's too: ``random``'s draw).
        k: the number of blocks, for the methods that take it (``choose_layers``).
        keep_probes: LAET's methods: also return the ``BatchedProbe`` (the probes become the training heads).
        select_kwargs: further ``choose_layers`` arguments (``splits``; ``cost_model``, ``budget_s``... for
            ``laet-cost``).

    Returns:
        ``(selection, scores, probes)``: ``scores`` None for a method that does not score, ``probes`` None
        unless ``keep_probes`` for a LAET method.
    """
    from .layers import find_layers

    method = parse_method(method)
    keep_probes = keep_probes and method in PROBE_METHODS
    scored = score_layers(model, batches, method, labels=labels, layers=layers, return_probes=keep_probes, seed=seed,
                          own_loss=own_loss, progress=progress, probe_examples=probe_examples, **probe_kwargs)
    scores, probes = scored if keep_probes else (scored, None)
    selection = choose_layers(scores, method, k=k, num_layers=len(find_layers(model, layers)), seed=seed,
                              **(select_kwargs or {}))
    return selection, scores, probes


def choose_layers(scores: "LayerScores | None", method, *, k: int | None = None, num_layers: int, seed: int = 0,
                  **select_kwargs) -> Selection:
    """The blocks to train for ``method``, from ``score_layers``' scores.

    Args:
        scores: ``score_layers``' output (its LayerScores when it returned probes too); None for
            score-free methods.
        method: see :data:`METHODS`, or an explicit list of block indices.
        k: how many blocks; needed by ``block_influence``, ``relative_change``, ``last`` and
            ``random``. ``grad_norm`` without k uses the variance split, ``laet`` without k its
            margin rule (``select_layers(strategy="laet")``); with k both take the k best. ``laet-cost``
            takes at most k blocks.
        num_layers: the model's number of blocks.
        seed: seed of ``random``.
        **select_kwargs: further ``select_layers`` arguments (``splits``, ``low``, ``high``, ``margin``;
            ``laet-cost``: ``cost_model`` and at most one of ``budget_s`` / ``budget_gb``).

    Returns:
        A ``Selection`` whose ``strategy`` names the method (``params`` says how it was chosen).
    """
    method = parse_method(method)
    if not isinstance(method, str):
        return Selection(layers=method, num_layers=num_layers, strategy="manual")
    if method == "all":
        if k is not None and k != num_layers:
            raise ValueError(f"method 'all' trains all {num_layers} blocks; drop k={k} or choose 'last' with k.")
        return Selection(layers=tuple(range(num_layers)), num_layers=num_layers, strategy="all")
    if method in ("last", "random"):
        return select_layers(None, strategy=method, k=k, seed=seed, num_layers=num_layers, **select_kwargs)
    if scores is None:
        raise ValueError(f"method {method!r} chooses from scores; run score_layers first.")
    if method == "laet-cost":
        from .cost import laet_cost_selection

        unknown = sorted(set(select_kwargs) - {"cost_model", "margin", "budget_s", "budget_gb"})
        if unknown:
            raise ValueError(f"method 'laet-cost' takes cost_model, margin, budget_s and budget_gb, not "
                             f"{', '.join(unknown)}.")
        acc, f1 = laet_scores(scores, num_layers)
        return laet_cost_selection(acc, f1, k=k, **select_kwargs)[0]
    metric = METRIC_OF[method]
    if k is not None:
        strategy = "top"
    elif method == "grad_norm":
        strategy = "variance_split"
    elif method == "laet":
        strategy = "laet"
    else:  # NEEDS_K
        raise ValueError(f"method {method!r} needs k, the number of blocks to train.")
    return select_layers(scores, metric=metric, strategy=strategy, k=k, num_layers=num_layers, **select_kwargs)


def check_reselectable(method):
    """``method`` parsed (``parse_method``); a ValueError when it is not one of :data:`RESELECTABLE`."""
    method = parse_method(method)
    if method not in RESELECTABLE:
        raise ValueError(f"reselect_every needs a method that can choose again while training "
                         f"({', '.join(RESELECTABLE)}), not {method!r}.")
    return method


def reselector_for(model: "nn.Module", method, every: int, *, k: int | None = None, optimizer=None,
                   apply_kwargs: dict | None = None, layers: str | None = None, **select_kwargs):
    """The ``Reselector`` that chooses ``method``'s blocks again every ``every`` optimizer steps, and its probe.

    Args:
        model: the model being trained, its first selection applied.
        method: one of :data:`RESELECTABLE`; any other is refused with a ValueError.
        every: re-select every this many optimizer steps.
        k: how many blocks (``top`` of the method's metric, or ``random``'s draw); None: ``grad_norm``'s
            variance split.
        optimizer, apply_kwargs, layers: as ``Reselector`` takes them.
        **select_kwargs: further ``select_layers`` arguments (``splits``, ``low``, ``high``, ``seed``...).

    Returns:
        ``(reselector, probe)``. The probe is detached: attach it over the training steps only, so that
        evaluation passes are not scored. ``random`` has a stand-in probe without scores, and its n-th
        re-selection draws with ``seed + n``.
    """
    from .probe import LayerProbe
    from .reselect import Reselector

    method = check_reselectable(method)
    if method == "random":
        probe, strategy = _NoScores(), "random"
    else:
        probe = LayerProbe(model, layers=layers, grad_norms=method == "grad_norm")
        select_kwargs["metric"] = METRIC_OF[method]
        strategy = "top" if k is not None else "variance_split"
    if k is not None:
        select_kwargs["k"] = k
    reselector = Reselector(model, probe, every, strategy=strategy, optimizer=optimizer, apply_kwargs=apply_kwargs,
                            layers=layers, **select_kwargs)
    return reselector, probe


class _NoScores:
    """The probe of a score-free re-selection (``random``): nothing to gather."""

    grad_norms = None

    def attach(self):
        return self

    def detach(self):
        pass

    def scores(self):
        return None

    def reset(self):
        pass

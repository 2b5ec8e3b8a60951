"""``LaetCallback``: layer-selective fine-tuning inside an existing ``transformers.Trainer`` (or TRL's trainers).

At train begin the callback scores the blocks on the Trainer's own first batches, chooses the
blocks with the same methods as ``laet_fast.Trainer`` (``laet_fast.methods``), applies the
choice (``apply_selection``: freeze, quantize the frozen blocks, cut the backward pass below the
lowest trained block), and keeps the Trainer's optimizer to the trainable parameters only. With
``reselect_every`` it re-scores every block while training and moves the trained set on schedule.

What the peers' users ran into, and what happens here instead:

* The optimizer is the Trainer's own object, edited in place: frozen parameters leave its groups
  before any state exists (AdamW allocates state at the first step), a joining block enters the
  group of the same layer of another block with empty state and is updated from its next step, and
  a leaving block drops its state and keeps its weights. The scheduler scales the groups' learning
  rates and holds no parameters, so it stays valid (LISA's optimizer, built once, never trained a
  re-selected layer: LMFlow issue 726).
* Under DDP the Trainer wrapped the model before any callback runs, with every parameter in DDP's
  buckets; the callback rebuilds the buckets over the trainable parameters after every change
  (``laet_fast.distributed.rebuild_ddp``), so ``find_unused_parameters`` is not needed and frozen
  blocks hold no bucket memory. Scores are all-reduced (LAET's pooled features gathered), and rank
  0's choice is broadcast, so every rank picks the same blocks.
* FSDP and DeepSpeed are refused: the Trainer shards the model before any callback runs
  (``laet_fast.integrations.fully_shard_selection`` shards a selection in a loop of your own).
* transformers gives callbacks the model and the optimizer but not the Trainer, whose callback handler
  (the ``report_to`` backends) and wrapped model the callback needs; it finds the Trainer that holds it
  from the objects that refer to it (its callback list), once per training.
"""
from __future__ import annotations

import gc
import math
import warnings

import torch
import torch.nn as nn
from transformers import TrainerCallback

from ..apply import apply_selection
from ..distributed import broadcast_object, rank_and_world
from ..methods import PROBE_EXAMPLES, PROBE_METHODS, check_reselectable, choose_blocks, parse_method, reselector_for
from ..quantize import mode_name


class LaetCallback(TrainerCallback):
    """Train only the blocks a method chooses, inside a ``transformers.Trainer``.

    Args:
        method: a name from ``laet_fast.train.METHODS`` (``"grad_norm"``, ``"block_influence"``,
            ``"relative_change"``, ``"last"``, ``"random"``, ``"all"``, ``"laet"``, ``"laet-cost"``) or a list of block
            indices. The default, ``"all"`` (every block; embeddings and LM head frozen), is the accuracy table's
            pick (``benchmarks/results/accuracy.json``, ``callback_default``) of the rows the callback trains as
            the table did: full fine-tuning and the ``grad_norm`` split. On both datasets it was the more accurate
            (0.828 against 0.820, 0.774 against 0.762) and ``grad_norm``'s 9% fewer CPU seconds are within the
            timing's noise. ``"grad_norm"`` trains fewer blocks (11 to 19 of 30 there) in less memory.
        k: how many blocks (see ``choose_layers``; ``grad_norm`` without k uses the variance split).
        reselect_every: re-score and re-select every this many optimizer steps (None: never), except after the
            last step, which no step follows. Only for ``laet_fast.train.RESELECTABLE`` methods: ``grad_norm``,
            ``block_influence``, ``relative_change`` and ``random`` (a new draw each time).
        quantize_frozen: ``"nf4"``, ``"fp4"``, ``"int8"`` or None: the frozen blocks' linear layers in
            bitsandbytes form (blocks that ever trained are never quantized).
        score_batches: how many of the Trainer's first train batches (this rank's) to score on, for every method
            but ``"laet"`` and ``"laet-cost"``.
        probe_examples: ``"laet"`` / ``"laet-cost"``: the probes learn from the pooled features of the Trainer's
            first this many train examples (of all ranks), or of all of them when there are fewer.
        **select_kwargs: further ``choose_layers`` / ``select_layers`` arguments (``seed``, ``splits``,
            ``low``, ``high``, ``margin``; ``"laet-cost"``: ``budget_s`` or ``budget_gb``, costed for the
            first batch's shape).

    Attributes:
        scores: the ``LayerScores`` of the last scoring (None for score-free methods).
        selection: the ``Selection`` in force.
        history: ``(global_step, Selection)`` for the first selection and every re-selection.

    The Trainer's batches must hold ``input_ids`` and ``attention_mask``; ``"laet"`` also needs a
    classification dataset (integer ``labels``, one class per row): its probes choose the blocks
    (``"laet-cost"``: the cheapest set of LAET's kept blocks that holds the best probe's block,
    ``laet_fast.cost.laet_cost_selection``), and the model's own task head (``score`` / ``classifier``) trains
    with them. The probes are not kept as heads, as ``laet_fast.Trainer`` keeps them: the Trainer computes the
    model's own loss.
    """

    def __init__(self, method="all", k: int | None = None, reselect_every: int | None = None,
                 quantize_frozen: str | None = None, score_batches: int = 8, probe_examples: int = PROBE_EXAMPLES,
                 **select_kwargs):
        self.method = parse_method(method)
        if reselect_every is not None:
            if not isinstance(reselect_every, int) or isinstance(reselect_every, bool) or reselect_every < 1:
                raise ValueError(f"reselect_every={reselect_every!r}: re-select every N optimizer steps with an "
                                 f"integer N >= 1, or None.")
            check_reselectable(self.method)
        if not isinstance(score_batches, int) or isinstance(score_batches, bool) or score_batches < 1:
            raise ValueError(f"score_batches={score_batches!r}: score on an integer number >= 1 of batches.")
        if not isinstance(probe_examples, int) or isinstance(probe_examples, bool) or probe_examples < 1:
            raise ValueError(f"probe_examples={probe_examples!r}: train the probes on an integer number >= 1 of "
                             f"examples.")
        self.k = k
        self.reselect_every = reselect_every
        self.quantize_frozen = mode_name(quantize_frozen)
        self.score_batches = score_batches
        self.probe_examples = probe_examples
        self.select_kwargs = dict(select_kwargs)
        self.scores = None
        self.selection = None
        self.history: list = []
        self._trainer = None
        self._probe = None
        self._reselector = None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._trainer = self._find_trainer(model)
        self._refuse_sharding()
        batches = self._first_batches(train_dataloader, model)
        select_kwargs = dict(self.select_kwargs)
        seed = select_kwargs.pop("seed", 0)
        if self.method == "laet-cost":
            select_kwargs["cost_model"] = _cost_model(model, batches[0], self.quantize_frozen)
        selection, self.scores = self._choose(model, batches, seed, select_kwargs)
        # Every rank scored the same global statistics; rank 0's choice is handed to all, so that no rounding
        # difference between ranks can make them train different blocks.
        self.scores, selection = broadcast_object((self.scores, selection))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        apply_selection(model, selection, quantize_frozen=self.quantize_frozen, dtype=dtype)
        model.zero_grad(set_to_none=True)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if inner is not None:
            _keep_trainable(inner, model)
        self._rebuild_wrapper(model)
        self.selection = selection
        self.history.append((state.global_step, selection))
        if self.reselect_every is not None:
            self._reselector, self._probe = reselector_for(
                model, self.method, self.reselect_every, k=self.k, optimizer=inner,
                apply_kwargs={"quantize_frozen": self.quantize_frozen}, **self.select_kwargs)
        self._log(args, state, control, self.scores, selection)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._probe is not None:
            self._probe.attach()  # training steps only: evaluation forwards are not scored

    def on_step_end(self, args, state, control, **kwargs):
        if self._probe is None:
            return
        self._probe.detach()
        if state.global_step >= state.max_steps:
            return  # no step follows: a block chosen now would never train
        reselector = self._reselector
        before = reselector.selection.layers
        new = reselector.step()
        if new is None:
            return
        self.selection = new
        self.history.append((state.global_step, new))
        if new.layers != before:
            self._rebuild_wrapper(reselector.model)
        self._log(args, state, control, {new.metric: list(new.scores)} if new.metric else None, new)

    def on_train_end(self, args, state, control, **kwargs):
        if self._probe is not None:
            self._probe.detach()

    # ------------------------------------------------------------------ internals
    def _find_trainer(self, model):
        """The Trainer whose callbacks include this one (transformers passes callbacks no Trainer).

        Walks up from this callback through the objects referring to it (the handler's list, the
        handler, the Trainer's attribute dict), a few steps, never the whole heap.
        """
        from transformers import Trainer
        from transformers.trainer_callback import CallbackHandler

        frontier, seen = [self], {id(self)}
        for _ in range(6):
            found = []
            for obj in frontier:
                for ref in gc.get_referrers(obj):
                    if id(ref) in seen or ref is frontier or ref is found:
                        continue
                    seen.add(id(ref))
                    if isinstance(ref, Trainer) and ref.model is model and self in ref.callback_handler.callbacks:
                        return ref
                    if isinstance(ref, (list, dict, CallbackHandler)):
                        found.append(ref)
            frontier = found
        return None

    def _refuse_sharding(self) -> None:
        wrapped = getattr(self._trainer, "model_wrapped", None)
        name = type(wrapped).__name__
        sharded_by_trainer = (getattr(self._trainer, "is_deepspeed_enabled", False)
                              or getattr(self._trainer, "is_fsdp_enabled", False))
        if "FSDP" in name or "FullyShardedDataParallel" in name or "DeepSpeed" in name or sharded_by_trainer:
            raise NotImplementedError("LaetCallback works on one device and under DDP; FSDP and DeepSpeed shard "
                                      "the blocks it freezes and quantizes (see the README's Integrations).")

    def _choose(self, model, batches: list[dict], seed: int, select_kwargs: dict):
        """(selection, scores) by ``laet_fast.methods.choose_blocks``, the Trainer's way, on the first batches of
        every rank. LAET's methods train their probes on the pooled block outputs of the labelled rows (each rank
        pools its own rows, gathered batch by batch in rank order: under the Trainer's sharding, rank r holds the
        r-th slice of each global batch, so the probes see the rows one process would, in the same order); the
        others score the gradient norms of the loss the Trainer trains on, the model's own."""
        if self.method not in PROBE_METHODS:
            selection, scores, _ = choose_blocks(model, batches, self.method, k=self.k, seed=seed, own_loss=True,
                                                 select_kwargs=select_kwargs)
            return selection, scores
        for batch in batches:
            labels = batch.get("labels")
            if labels is None or labels.dim() != 1 or labels.is_floating_point():
                shape = "none" if labels is None else f"{labels.dtype} {list(labels.shape)}"
                raise ValueError(f"LaetCallback(method={self.method!r}) trains a probe per block on one class label "
                                 f"per row; the Trainer's batches have labels {shape} (a causal-LM dataset has one "
                                 "label per token). Use a classification dataset (e.g. "
                                 "AutoModelForSequenceClassification with an integer 'labels' column), or another "
                                 "method.")
        texts = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
        labels = torch.cat([b["labels"].cpu() for b in batches])
        was_training = model.training
        model.eval()  # no dropout in the features the probes are trained on
        try:
            selection, scores, _ = choose_blocks(model, texts, self.method, k=self.k, labels=labels, seed=seed,
                                                 probe_examples=self.probe_examples, select_kwargs=select_kwargs)
        finally:
            model.train(was_training)
        return selection, scores

    def _first_batches(self, dataloader, model) -> list[dict]:
        if dataloader is None:
            raise ValueError("LaetCallback: the Trainer has no train dataloader to score on.")
        # accelerate's loader moves batches and keeps epoch state; its plain DataLoader (this rank's
        # shard) is read instead, so the training epoch starts untouched.
        loader = getattr(dataloader, "base_dataloader", dataloader)
        device = next(model.parameters()).device
        # LAET's probes: this rank's share of probe_examples rows (score_layers keeps the first probe_examples of
        # the gathered rows); the other methods: score_batches batches.
        rows_wanted = math.ceil(self.probe_examples / rank_and_world()[1]) if self.method in PROBE_METHODS else None
        batches, rows = [], 0
        for batch in loader:
            if "input_ids" not in batch or "attention_mask" not in batch:
                raise ValueError("LaetCallback scores on batches with input_ids and attention_mask; the Trainer's "
                                 f"batches hold {sorted(batch)}.")
            batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            rows += int(batch["input_ids"].shape[0])
            if (rows >= rows_wanted) if rows_wanted is not None else len(batches) == self.score_batches:
                break
        return batches

    def _rebuild_wrapper(self, model) -> None:
        wrapped = getattr(self._trainer, "model_wrapped", model)
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            from ..distributed import rebuild_ddp

            rebuild_ddp(wrapped)
        elif self._trainer is None:
            from ..distributed import is_distributed

            if is_distributed():
                warnings.warn("LaetCallback: no Trainer holds this callback, so a DDP wrapper could not be found "
                              "and rebuilt; frozen parameters stay in its buckets.", stacklevel=2)

    def _log(self, args, state, control, scores, selection) -> None:
        """Per-layer metrics and the selection (1.0 = trained), as numbers every ``report_to`` accepts.

        The line goes to ``state.log_history`` and to every callback's ``on_log`` (the ``report_to`` backends),
        not through ``Trainer.log``: that ends in the handler's ``on_log``, which clears ``control.should_log``,
        so the Trainer's own line of this step, decided before this event, was never written; and a subclass's
        ``log`` (TRL's) hands the line the metrics it gathered for its own, and clears them.
        """
        logs = {}
        for metric, values in (scores or {}).items():
            for index, value in enumerate(values):
                logs[f"laet/{metric}/layer_{index}"] = float(value)
        for index in range(selection.num_layers):
            logs[f"laet/selected/layer_{index}"] = float(index in selection.layers)
        logs["laet/num_selected"] = float(len(selection))
        state.log_history.append({**logs, "step": state.global_step})
        handler = getattr(self._trainer, "callback_handler", None)
        if handler is not None:
            should_log = control.should_log
            handler.on_log(args, state, control, logs)
            control.should_log = should_log


def _cost_model(model: nn.Module, batch: dict, quantize_frozen: str | None):
    """The step of ``batch``'s shape (rows, tokens) on ``model`` in its dtype, as ``laet_fast.cost`` costs it."""
    from ..cost import CostModel
    from ..memory import dtype_label

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    rows, tokens = batch["input_ids"].shape
    return CostModel(model.config, seq_len=int(tokens), batch_size=int(rows), quantize_frozen=quantize_frozen,
                     dtype=dtype_label(dtype))


def _keep_trainable(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Remove from ``optimizer``'s groups (and state) every parameter of ``model`` that no longer trains,
    and add the trainable ones it lacks to its first group: in place, so the Trainer's scheduler and
    accelerate's wrapper keep pointing at it."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    keep = {id(p) for p in trainable}
    present = set()
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) in keep]
        for param in group["params"]:
            if id(param) not in keep:
                optimizer.state.pop(param, None)
        group["params"] = kept
        present.update(id(p) for p in kept)
    # Parameters created by apply_selection (a quantized block's bias, a dequantized weight) are new objects.
    missing = [p for p in trainable if id(p) not in present]
    if missing:
        optimizer.param_groups[0]["params"].extend(missing)

"""Dynamic re-selection: re-score every layer during training and move the trained set.

Every ``every`` optimizer steps the :class:`Reselector` reads the probe's scores gathered since the
previous re-selection (every block scored fresh, frozen ones included, by an attached
``LayerProbe(model, grad_norms=True)``), chooses layers with ``select_layers``, applies the choice
with ``laet_fast.apply.apply_selection`` and updates the optimizer:

* parameters that stop being trainable leave their param group, their optimizer state is dropped
  and their ``.grad`` released; their weights stay exactly what training left (``apply_selection``
  never quantizes a block that was trained);
* parameters that become trainable join the param group that held the same parameter of another
  block (same name inside the block, e.g. ``mlp.down_proj.weight``), so learning rate and weight
  decay follow the user's grouping; they start with empty state.

Typical loop::

    with LayerProbe(model, grad_norms=True) as probe:
        reselector = Reselector(model, probe, every=100, optimizer=optimizer)
        for batch in data:
            model(**batch).loss.backward()
            optimizer.step()
            reselector.step()
            optimizer.zero_grad()
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.nn as nn

from .layers import find_layers
from .selection import STRATEGIES, Selection, select_layers


class Reselector:
    """Re-score and re-select the trained layers every ``every`` optimizer steps.

    Args:
        model: the model being trained (a selection may already be applied).
        probe: an attached ``LayerProbe`` (``grad_norms=True`` for the ``grad_norm`` metric), or any
            object with ``scores()`` (a ``LayerScores`` or mapping) and ``reset()``.
        every: re-select after every ``every`` calls to :meth:`step`.
        strategy: a ``select_layers`` strategy.
        optimizer: a ``torch.optim.Optimizer`` to keep in step with the selection (optional).
        apply_kwargs: keyword arguments for ``apply_selection`` (``quantize_frozen``, ``dtype``, ...).
        layers: dotted path of the block list when ``find_layers`` cannot find it.
        **select_kwargs: further ``select_layers`` arguments (``metric``, ``k``, ``low``, ``high``, ``seed``;
            with ``strategy="random"`` the n-th re-selection draws with ``seed + n``).

    Attributes:
        selection: the selection in force (at the start: the blocks whose parameters are all trainable).
        history: ``(step, Selection)`` for the initial selection and every re-selection.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any,
        every: int,
        strategy: str = "variance_split",
        optimizer: torch.optim.Optimizer | None = None,
        apply_kwargs: dict | None = None,
        layers: str | None = None,
        **select_kwargs,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: re-select every N optimizer steps with an integer N >= 1.")
        metric = select_kwargs.get("metric", "grad_norm")
        if metric in ("grad_norm", "grad_norm_sq") and getattr(probe, "grad_norms", True) is False:
            raise ValueError(
                f"metric={metric!r} needs gradient norms, but the probe was made without them: use "
                f"LayerProbe(model, grad_norms=True)."
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        self.model = model
        self.probe = probe
        self.every = every
        self.strategy = strategy
        self.optimizer = optimizer
        self.apply_kwargs = dict(apply_kwargs or {})
        self.select_kwargs = dict(select_kwargs)
        self.stack = find_layers(model, layers)
        self._check_choice(probe, metric)
        self.steps = 0
        trained = [i for i, block in enumerate(self.stack)
                   if any(True for _ in block.parameters()) and all(p.requires_grad for p in block.parameters())]
        self.selection = Selection(layers=tuple(trained), num_layers=len(self.stack))
        self.history: list[tuple[int, Selection]] = [(0, self.selection)]

    def step(self) -> Selection | None:
        """Call after each ``optimizer.step()``; re-selects on every ``every``-th call.

        Returns the new Selection when one was made on this step, else None.
        """
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.reselect()

    def reselect(self) -> Selection | None:
        """Score, select and apply now; then start the probe's next scoring window.

        If too few layers have finite scores, the current selection is kept with a warning.
        """
        scores = self.probe.scores()
        kwargs = dict(self.select_kwargs)
        if self.strategy == "random":  # a new draw each time (LISA): the n-th re-selection draws with seed + n
            kwargs["seed"] = kwargs.get("seed", 0) + self.steps // self.every
        try:
            selection = select_layers(scores, strategy=self.strategy, num_layers=len(self.stack), **kwargs)
        except ValueError as err:
            if "finite" not in str(err):
                raise
            warnings.warn(f"laet_fast.Reselector: keeping layers {list(self.selection.layers)} at step "
                          f"{self.steps}: {err}", stacklevel=2)
            self.probe.reset()
            return None
        self.probe.reset()
        if selection.layers != self.selection.layers:
            self._apply(selection)
        self.selection = selection
        self.history.append((self.steps, selection))
        return selection

    def as_trainer_callback(self):
        """A ``transformers.TrainerCallback`` calling :meth:`step` after each optimizer step.

        Without an ``optimizer`` given here, the Trainer's own (unwrapped from accelerate's
        ``AcceleratedOptimizer``) is adopted at the first step. Keep the probe attached while
        ``trainer.train()`` runs.
        """
        from transformers import TrainerCallback

        reselector = self

        class ReselectorCallback(TrainerCallback):
            def on_step_end(self, args, state, control, optimizer=None, **kwargs):
                if reselector.optimizer is None and optimizer is not None:
                    reselector.optimizer = getattr(optimizer, "optimizer", optimizer)
                reselector.step()

        return ReselectorCallback()

    # ------------------------------------------------------------------ internals
    def _check_choice(self, probe: Any, metric: str) -> None:
        """Find bad selection arguments now rather than at the first re-selection, mid-training.

        A LayerProbe's metrics are known in advance; ``select_layers`` then runs once on stand-in
        scores (one distinct value per block) to check ``k``, the bounds, ``splits`` and unknown keywords.
        """
        from .probe import LayerProbe
        from .quantize import mode_name
        from .scores import METRIC_ORDER

        if isinstance(probe, LayerProbe):
            available = [m for m in METRIC_ORDER if probe.grad_norms or not m.startswith("grad_norm")]
            if metric not in available:
                raise ValueError(f"metric={metric!r} is not one a LayerProbe gives; choose one of "
                                 f"{', '.join(available)}.")
        if "quantize_frozen" in self.apply_kwargs:
            mode_name(self.apply_kwargs["quantize_frozen"])
        stand_in = {metric: [float(i + 1) for i in range(len(self.stack))]}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a stand-in split landing on a bound says nothing
                select_layers(stand_in, strategy=self.strategy, num_layers=len(self.stack), **self.select_kwargs)
        except TypeError as err:
            raise ValueError(f"Reselector: {err}; the keyword arguments after apply_kwargs go to select_layers "
                             f"(metric, k, low, high, seed, splits).") from None
        except ValueError as err:
            raise ValueError(f"Reselector: {err}") from None

    def _apply(self, selection: Selection) -> None:
        from .apply import applied_state, apply_selection

        before = {id(p): p for p in self.model.parameters() if p.requires_grad}
        kwargs = dict(self.apply_kwargs)
        if applied_state(self.model) is None:
            if "dtype" not in kwargs:
                # A first apply_selection would cast the whole model to its default dtype (bfloat16
                # on CUDA), re-rounding the weights trained so far: keep the dtype training runs in.
                trained = next((p for p in before.values() if p.is_floating_point()), None)
                if trained is not None:
                    kwargs["dtype"] = trained.dtype
            # apply_selection never quantizes a block it has seen trained; blocks trained before
            # its first call are made known to it first, so quantize_frozen cannot round them.
            trained_blocks = [i for i, block in enumerate(self.stack)
                              if any(p.requires_grad for p in block.parameters())]
            apply_selection(self.model, Selection(tuple(trained_blocks), len(self.stack)), **kwargs)
        apply_selection(self.model, selection, **kwargs)
        trainable = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        keep = {id(p) for _, p in trainable}
        for pid, param in before.items():
            if pid not in keep:
                param.grad = None  # a frozen parameter keeps no gradient
        if self.optimizer is not None:
            # Only parameters that became trainable join: one that was trainable already and is not
            # in this optimizer was left out on purpose (e.g. a head with its own optimizer).
            joining = [(name, p) for name, p in trainable if id(p) not in before]
            self._sync_optimizer(joining, keep)

    def _role(self, name: str) -> str:
        """A parameter's name with its block index removed: the same for the same layer of any block."""
        prefix = re.escape(self.stack.path) + r"\.\d+\."
        return re.sub(rf"^(.*?){prefix}", r"\1<block>.", name)

    def _sync_optimizer(self, joining: list[tuple[str, nn.Parameter]], keep: set[int]) -> None:
        optimizer = self.optimizer
        names = {id(p): name for name, p in self.model.named_parameters()}
        group_of_role: dict[str, int] = {}
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if id(param) in names:
                    group_of_role.setdefault(self._role(names[id(param)]), index)
        # Leaving parameters: out of their group, state dropped.
        present = set()
        for group in optimizer.param_groups:
            kept = []
            for param in group["params"]:
                if id(param) in keep:
                    kept.append(param)
                    present.add(id(param))
                else:
                    optimizer.state.pop(param, None)
            group["params"] = kept
        # Joining parameters: into the group of their role (else the first group), with no state.
        for name, param in joining:
            if id(param) not in present:
                group = optimizer.param_groups[group_of_role.get(self._role(name), 0)]
                group["params"].append(param)
                present.add(id(param))

    def __repr__(self) -> str:
        return (f"Reselector(every={self.every}, strategy={self.strategy!r}, steps={self.steps}, "
                f"layers={list(self.selection.layers)}, reselections={len(self.history) - 1})")

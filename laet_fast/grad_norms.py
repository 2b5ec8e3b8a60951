"""Per-block gradient norms measured in the backward pass, for trainable and frozen blocks alike.

Each backward pass adds, per transformer block, the L2 norm of the gradient the loss gives that
block's parameters, as if every parameter of the block were trainable. Nothing is made trainable
and no weight gradient of a frozen layer is ever stored:

* Trainable parameters: the gradient arrives through a hook on the parameter (it sees the pass's
  own gradient, before accumulation into ``.grad``).

  - ``.grad`` was empty before the pass (the usual ``zero_grad(set_to_none=True)``): after the pass
    ``.grad`` *is* the pass's gradient, so the hook only remembers the parameter, and at the end of
    the backward pass all of them go to ONE ``grouped_sq_norms`` launch (per dtype).
  - ``.grad`` already held a value (gradient accumulation without zeroing): the pass's gradient is
    the increment, which exists as a tensor only inside the hook, so its squared norm is added
    there by ``accumulate_sq_norm`` (two device ops, no host tables or pinned copies, no copy
    kept). Exact, and no snapshot of ``.grad``.

* Frozen linear layers (``nn.Linear`` and subclasses such as bitsandbytes ``Linear4bit`` /
  ``Linear8bitLt``; GPT-2's ``Conv1D``): a forward hook keeps the layer input X (detached, the
  tensor a trainable layer would save; under autocast, in the autocast dtype the layer computes
  in, so that X and dY share a dtype and the kernel runs on the tensor cores; one copy for the
  layers that read one tensor) and hooks the output. Over a block under non-reentrant gradient
  checkpointing X is not kept from the forward: a forward pre-hook takes it from the checkpoint's
  recomputation in the backward pass (so the probe costs what a frozen backward costs there; the
  block is reported if the recomputation never brings it). When dY arrives,
  ``||dW||_F^2 = ||X^T dY||_F^2`` is accumulated by ``linear_grad_sq_norm`` without an [in, out]
  buffer, the bias adds ``||sum_tokens dY||^2``, and X is released.

* Other small frozen parameterised modules (RMSNorm, LayerNorm, ...): the module forward is
  recomputed on its saved input with temporary trainable copies of its frozen parameters and
  ``torch.autograd.grad(..., grad_outputs=dY)`` gives their exact gradient (parameter-sized).

Everything accumulates into a float32 device buffer with one slot per block; nothing syncs with
the host until ``metrics()`` / ``history()``. The end of the backward pass is found with the
autograd engine's ``queue_callback``.

Limits, each reported rather than turned into a wrong number: NaN/Inf in a gradient makes that
block's score non-finite (warning naming it); a block the backward pass does not reach, or whose
frozen layers get gradients from two forward passes in one backward (``loss1 + loss2``), is marked
non-finite with the reason, and so is a block whose frozen layer's input was modified in place
after the layer ran, or whose trainable gradient never reached ``.grad`` (``torch.autograd.grad``);
a backward pass that raised is dropped; reentrant gradient checkpointing is refused (non-reentrant,
the transformers default, works); a frozen parameter that is neither in a linear layer nor in a
small module returning a tensor raises an error naming it, and one whose module never ran in a
block that did (weights used through a functional call) is warned about.

When every parameter below a block is frozen, the backward pass would not reach it; the hidden
state entering the first block is made to require grad (like ``enable_input_require_grads``, on a
fresh leaf so no user tensor changes), and ``laet_fast.apply.suspend_backward_cut``
keeps the backward pass running below the lowest trained block while attached.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from .layers import is_linear_like

# Frozen parameters of a non-linear module are scored by recomputing it with trainable copies of
# them, which costs a gradient of their size; above this many elements that would no longer be the
# "small module" the method is meant for, so it is refused with an explanation.
GENERIC_MAX_NUMEL = 1 << 20
# Forward passes whose checkpointed calls may still be waiting for their backward pass.
_KEPT_GENERATIONS = 8


def _graph_task_id() -> int:
    """The id of the backward pass autograd is running now, -1 outside any."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id() if task_id is not None else -1


def in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing re-runs forwards, hooks included)."""
    return _graph_task_id() != -1


def _detach(value):
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes with on input ``x``: under autocast a float32 input is cast
    to the autocast dtype (as the layer's matmul does). Saving X in it gives X and dY one half dtype
    at the norm kernel (the tensor cores, not the float32 FMA path) and a half-size copy."""
    device_type = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _tensors(value) -> list[torch.Tensor]:
    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


# A frozen layer's saved input shares its version counter with the original; a later in-place
# change would make X^T dY (or the recomputation) silently wrong, where a trainable layer's
# autograd would have raised.
_MODIFIED_IN_PLACE = ("the input of {} was modified in place after the layer ran, so its saved input no longer "
                      "gives the gradient; avoid the in-place operation while scoring")


class _Ref:
    """A weak reference to a module or parameter plus the hook handle registered on it."""

    __slots__ = ("ref", "handle")

    def __init__(self, obj, handle):
        self.ref = weakref.ref(obj)
        self.handle = handle


class _Inputs:
    """The inputs of one frozen module call, kept from its forward until its output gradient arrives
    (or, over a checkpointed block, given by the checkpoint's recomputation in the backward pass)."""

    __slots__ = ("block", "generation", "qualified", "take", "value", "versions", "pending", "used")

    def __init__(self, block: int, generation: int, qualified: str, take):
        self.block = block
        self.generation = generation
        self.qualified = qualified
        self.take = take
        self.value = None
        self.versions: list[int] = []
        self.pending = None  # the norm computation, when dY came before the recomputed inputs
        self.used = False

    def give(self, value) -> None:
        self.value = value
        self.versions = [t._version for t in _tensors(value)]


class GradNormRecorder:
    """Record per-block gradient norms of ``model``'s transformer blocks in every backward pass.

    Args:
        model: the model whose forward/backward passes are observed.
        stack: its ``laet_fast.layers.LayerStack`` (from ``find_layers``).

    Use ``attach()`` before the forward pass, run ``loss.backward()`` as usual (any number of
    times), read ``metrics()`` / ``history()``, ``detach()`` to remove every hook.
    """

    def __init__(self, model: nn.Module, stack):
        self.model = model
        self.stack = stack
        self.names = list(stack.names)
        self._attached = False
        self._kernels = None
        self._model_handles: list = []
        self._module_hooks: dict[tuple, _Ref] = {}
        self._param_hooks: dict[int, _Ref] = {}
        self._cut_context: contextlib.ExitStack | None = None
        self._recomputing = False
        self._generation = 0
        self._forwarded: set[int] = set()
        self._warned_not_run: set[str] = set()
        self._awaiting: dict[int, list[_Inputs]] = {}  # per module, calls waiting for recomputed inputs
        self._last_cast = None  # weak (source, its version, cast copy), shared by layers reading one tensor
        self.reset()

    # ------------------------------------------------------------------ public API
    def attach(self) -> None:
        """Install the hooks (idempotent). Parameters' ``requires_grad`` is never changed."""
        if self._attached:
            return
        from laet_fast.kernels.grad_norm import accumulate_sq_norm, grouped_sq_norms, linear_grad_sq_norm

        self._kernels = (grouped_sq_norms, linear_grad_sq_norm, accumulate_sq_norm)
        self._attached = True
        # Re-scan the blocks at every forward: a re-applied selection may swap modules or
        # parameters (e.g. a quantized frozen layer becoming a full-precision trainable one).
        self._model_handles.append(self.model.register_forward_pre_hook(self._on_model_forward))
        self._sync()
        self._suspend_cut()

    def detach(self) -> None:
        """Remove every hook and leave the model as it was."""
        for handle in self._model_handles:
            handle.remove()
        self._model_handles.clear()
        for entry in list(self._module_hooks.values()) + list(self._param_hooks.values()):
            entry.handle.remove()
        self._module_hooks.clear()
        self._param_hooks.clear()
        if self._cut_context is not None:
            self._cut_context.close()
            self._cut_context = None
        self._attached = False
        self._end_pass_state()

    def reset(self) -> None:
        """Forget every recorded backward pass."""
        self._passes: list[torch.Tensor] = []
        self._notes: dict[int, str] = {}
        self._end_pass_state()

    def metrics(self) -> dict[str, list[float]]:
        """``grad_norm``: per block, the mean over backward passes of the per-pass L2 norm.
        ``grad_norm_sq``: per block, the sum over passes of the squared norms.

        A block whose gradient held NaN/Inf in some pass gets a non-finite score, with a warning
        naming it. Without any recorded backward pass every score is NaN (with a warning).

        Under ``torch.distributed`` (more than one rank) both are over the passes of every rank (each
        rank's backward pass counts as one pass of its own micro-batch): call it on every rank.
        ``history()`` stays this rank's own.
        """
        from .distributed import all_reduce_sum, is_distributed

        squared = self._squared_history() if self._passes or not is_distributed() else None
        if is_distributed():
            # Per block: the sum over passes of the norms, of the squared norms; then the pass count.
            totals = torch.zeros(2 * len(self.names) + 1, dtype=torch.float64)
            if squared is not None:
                totals[:-1] = torch.cat([squared.sqrt().sum(0), squared.sum(0)])
                totals[-1] = len(squared)
            totals = all_reduce_sum(totals)
            passes = int(totals[-1].item())
            if passes:
                norms, squares = totals[:-1].view(2, -1)
                return {"grad_norm": (norms / passes).tolist(), "grad_norm_sq": squares.tolist()}
            squared = self._squared_history()  # no rank recorded a pass: the warning, and NaN
        if squared is None:
            nan = [math.nan] * len(self.names)
            return {"grad_norm": list(nan), "grad_norm_sq": list(nan)}
        return {
            "grad_norm": squared.sqrt().mean(0).tolist(),
            "grad_norm_sq": squared.sum(0).tolist(),
        }

    def history(self) -> list[list[float]]:
        """Per backward pass, per block L2 norms (a list of one list per pass)."""
        if not self._passes:
            return []
        return self._squared_history().sqrt().tolist()

    @property
    def num_passes(self) -> int:
        return len(self._passes)

    # ------------------------------------------------------------------ hooks: installation
    def _suspend_cut(self) -> None:
        """Hold ``laet_fast.apply.suspend_backward_cut(model)`` open.

        Re-entered at every forward (the suspension nests, so the count stays one): a selection
        applied after ``attach()`` is suspended too.
        """
        from laet_fast.apply import suspend_backward_cut

        fresh = contextlib.ExitStack()
        fresh.enter_context(suspend_backward_cut(self.model))
        if self._cut_context is not None:
            self._cut_context.close()
        self._cut_context = fresh

    def _on_model_forward(self, module, args):
        if not in_backward():
            self._generation += 1
            self._forwarded = set()
            self._last_cast = None
            # Calls of forwards that were never back-propagated keep no tensor, but do not keep them forever.
            for key, waiting in list(self._awaiting.items()):
                waiting[:] = [e for e in waiting if e.generation > self._generation - _KEPT_GENERATIONS]
                if not waiting:
                    del self._awaiting[key]
        self._sync()
        self._suspend_cut()
        self._refuse_reentrant_checkpointing()

    def _refuse_reentrant_checkpointing(self) -> None:
        """Reentrant checkpointing runs the blocks without grad and back-propagates them in nested
        backward passes, which the per-pass accounting cannot follow: refuse it rather than
        return wrong norms. Non-reentrant checkpointing (transformers' default) is supported."""
        if not (self.model.training and torch.is_grad_enabled()):
            return
        for name, block in zip(self.names, self.stack.blocks):
            if not getattr(block, "gradient_checkpointing", False):
                continue
            func = getattr(block, "_gradient_checkpointing_func", None)
            if getattr(func, "keywords", {}).get("use_reentrant", False):
                raise ValueError(
                    f"laet_fast gradient norms cannot follow reentrant gradient checkpointing (enabled on {name}). "
                    f"Use model.gradient_checkpointing_enable("
                    f"gradient_checkpointing_kwargs={{'use_reentrant': False}}) or score without it."
                )

    def _sync(self) -> None:
        """Hook every block, parameterised module and trainable parameter not hooked yet."""
        for b, block in enumerate(self.stack.blocks):
            if b == 0:
                self._hook_module(block, ("input", 0), self._require_grad_on_input)
            for name, module in block.named_modules():
                if next(module.parameters(recurse=False), None) is not None:
                    self._hook_module(module, ("params", b), self._make_module_hook(b, name))
                    self._hook_module(module, ("recompute", b), self._on_recompute)
            for param in block.parameters():
                if param.requires_grad:
                    self._hook_param(param, b)

    def _hook_module(self, module: nn.Module, role, hook) -> None:
        key = (id(module), role)
        entry = self._module_hooks.get(key)
        if entry is not None and entry.ref() is module:
            return
        if role[0] in ("input", "recompute"):
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=True)
        self._module_hooks[key] = _Ref(module, handle)

    def _hook_param(self, param: nn.Parameter, block: int) -> None:
        entry = self._param_hooks.get(id(param))
        if entry is not None and entry.ref() is param:
            return
        ref = weakref.ref(param)
        handle = param.register_hook(lambda grad: self._on_param_grad(ref, block, grad))
        self._param_hooks[id(param)] = _Ref(param, handle)

    # ------------------------------------------------------------------ hooks: forward
    def _require_grad_on_input(self, module, args, kwargs):
        """Let the backward pass reach the first block when nothing below it is trainable."""
        if not torch.is_grad_enabled() or self._recomputing or in_backward():
            return None
        if args and isinstance(args[0], torch.Tensor):
            hidden = args[0]
            if hidden.is_floating_point() and not hidden.requires_grad:
                return (hidden.detach().requires_grad_(True),) + tuple(args[1:]), kwargs
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            hidden = kwargs["hidden_states"]
            if hidden.is_floating_point() and not hidden.requires_grad:
                return args, {**kwargs, "hidden_states": hidden.detach().requires_grad_(True)}
        return None

    def _make_module_hook(self, block: int, name: str):
        def hook(module, args, kwargs, output):
            # Skipped: our own recomputation, no-grad forwards, and the forward that non-reentrant
            # gradient checkpointing re-runs inside the backward pass (its outputs get no gradient).
            if self._recomputing or not torch.is_grad_enabled() or in_backward():
                return
            frozen = [(n, p) for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
            if not frozen:
                return
            self._ran.add(id(module))
            qualified = f"{self.names[block]}.{name}" if name else self.names[block]
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"laet_fast cannot score the frozen parameter {qualified}.{frozen[0][0]}: its module "
                    f"{type(module).__name__} returns {type(output).__name__}, not a tensor. Make that parameter "
                    f"trainable, or score without grad_norms."
                )
            if not output.requires_grad:
                self._unreachable.add(block)
                return
            if id(module) in self._forwarded:
                # A layer called twice in one forward: its weight gradient is X1^T dY1 + X2^T dY2,
                # whose norm the per-call terms cannot give.
                self._mark_invalid(block, f"{qualified} ran more than once in one forward pass, so the norm of "
                                          f"its summed weight gradient cannot be formed exactly")
                return
            self._forwarded.add(id(module))
            if is_linear_like(module):
                self._watch_linear(module, block, qualified, frozen, args, kwargs, output)
            else:
                self._watch_generic(module, block, qualified, frozen, args, kwargs, output)

        return hook

    def _saved_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (detached) in the layer's compute dtype. Layers that read one tensor (q/k/v, gate/up)
        share one copy: the last cast is reused while its source is unchanged."""
        dtype = _compute_dtype(x)
        if dtype == x.dtype:
            return x.detach()  # a view: no memory beyond the tensor the forward made
        last = self._last_cast
        if last is not None and last[0]() is x and last[1] == x._version:
            cast = last[2]()
            if cast is not None and cast.dtype == dtype:
                return cast
        cast = x.detach().to(dtype)
        # Weak references only: the copy lives as long as a layer's saved inputs hold it.
        self._last_cast = (weakref.ref(x), x._version, weakref.ref(cast))
        return cast

    def _checkpointed(self, block: int) -> bool:
        """Whether ``block`` runs under (non-reentrant) gradient checkpointing in this forward: then its
        inputs are taken from the checkpoint's recomputation in the backward pass, not kept from the
        forward (transformers' ``GradientCheckpointingLayer`` convention)."""
        module = self.stack.blocks[block]
        return bool(getattr(module, "gradient_checkpointing", False)) and module.training

    def _inputs(self, module, block: int, qualified: str, take, args, kwargs) -> "_Inputs":
        """The inputs one frozen module call needs at its dY: ``take(args, kwargs)`` now, or, over a
        checkpointed block, what ``take`` gives on the checkpoint's recomputation of the call."""
        entry = _Inputs(block, self._generation, qualified, take)
        if self._checkpointed(block):
            self._awaiting.setdefault(id(module), []).append(entry)
        else:
            entry.give(take(args, kwargs))
        return entry

    def _on_recompute(self, module, args, kwargs):
        """Forward pre-hook: non-reentrant checkpointing re-runs a block's forward inside the backward
        pass; hand each waiting module call its recomputed inputs (a pre-hook, since the checkpoint may
        stop the recomputation inside the module, once the last tensor it needs is saved)."""
        if not in_backward() or self._recomputing:
            return
        waiting = self._awaiting.get(id(module))
        if not waiting:
            return
        if self._pass_generation is not None:
            matching = [e for e in waiting if e.generation == self._pass_generation]
        else:
            # No dY of this pass seen yet: only unambiguous when one forward is waiting.
            matching = waiting if len({e.generation for e in waiting}) == 1 else []
        if not matching:
            return
        entry = matching[-1]
        waiting.remove(entry)
        entry.give(entry.take(args, kwargs))
        if entry.pending is not None:
            self._waiting_dy.discard(entry)
            pending, entry.pending = entry.pending, None
            # Inside the checkpoint's recomputation its saved-tensor hooks are active: our own
            # autograd work (a norm's recomputation) must not be captured by them.
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                self._use(entry, pending)

    def _use(self, entry: "_Inputs", compute) -> None:
        """Run ``compute(inputs)`` with the saved inputs, or mark the block (used twice, modified in
        place), or wait for the checkpoint's recomputation to bring them."""
        if entry.used:
            self._mark_invalid(entry.block, f"{entry.qualified} was back-propagated twice through one forward graph")
            return
        if entry.value is None:
            entry.pending = compute
            self._waiting_dy.add(entry)
            return
        entry.used = True
        value, entry.value = entry.value, None
        if [t._version for t in _tensors(value)] != entry.versions:
            self._mark_invalid(entry.block, _MODIFIED_IN_PLACE.format(entry.qualified))
            return
        compute(value)

    def _watch_linear(self, module, block, qualified, frozen, args, kwargs, output) -> None:
        names = {n for n, _ in frozen}
        unknown = names - {"weight", "bias"}
        if unknown:
            raise TypeError(
                f"laet_fast cannot score the frozen parameter {qualified}.{sorted(unknown)[0]} of the linear layer "
                f"{type(module).__name__}: only weight and bias are understood. Make it trainable."
            )

        def take(args, kwargs):
            # A detached X shares its version counter with the original, which tells an in-place change
            # later on; an autocast copy is what the layer computed with, and nothing writes to it.
            return self._saved_input(args[0] if args else kwargs.get("input", kwargs.get("x")))

        inputs = self._inputs(module, block, qualified, take, args, kwargs) if "weight" in names else None
        has_bias = "bias" in names
        generation = self._generation

        def on_grad(dy: torch.Tensor):
            cur = self._begin_pass(dy.device)
            self._fired_from(block, generation)
            slot = cur[block:block + 1]
            if has_bias:
                bias_grad = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32)
                slot.add_(bias_grad.square().sum())
            if inputs is not None:
                self._use(inputs, lambda x_saved: self._kernels[1](x_saved, dy, slot))

        output.register_hook(on_grad)
        self._registered.add(block)

    def _watch_generic(self, module, block, qualified, frozen, args, kwargs, output) -> None:
        numel = sum(p.numel() for _, p in frozen)
        if numel > GENERIC_MAX_NUMEL:
            raise TypeError(
                f"laet_fast cannot score the frozen parameter {qualified}.{frozen[0][0]} ({type(module).__name__}, "
                f"{numel} elements): only linear layers and small modules such as norms are supported. "
                f"Make it trainable or score without grad_norms."
            )
        inputs = self._inputs(module, block, qualified, lambda a, k: (_detach(a), _detach(k)), args, kwargs)
        generation = self._generation

        def norm(saved, dy, cur):
            saved_args, saved_kwargs = saved
            copies = {n: p.detach().requires_grad_(True) for n, p in frozen}
            self._recomputing = True
            try:
                with torch.enable_grad():
                    again = torch.func.functional_call(module, copies, saved_args, saved_kwargs)
                    grads = torch.autograd.grad(again, list(copies.values()), grad_outputs=dy, allow_unused=True)
            finally:
                self._recomputing = False
            total = sum(g.float().square().sum() for g in grads if g is not None)
            if isinstance(total, torch.Tensor):
                cur[block:block + 1].add_(total)

        def on_grad(dy: torch.Tensor):
            cur = self._begin_pass(dy.device)
            self._fired_from(block, generation)
            self._use(inputs, lambda saved: norm(saved, dy, cur))

        output.register_hook(on_grad)
        self._registered.add(block)

    # ------------------------------------------------------------------ hooks: backward
    def _on_param_grad(self, ref, block: int, grad: torch.Tensor):
        param = ref()
        if param is None:
            return None
        cur = self._begin_pass(grad.device)
        self._fired.setdefault(block, set())
        if param.grad is None:
            self._fresh.append((param, block))
        else:
            self._kernels[2](grad, cur[block:block + 1])
        return None

    def _begin_pass(self, device: torch.device) -> torch.Tensor:
        """This pass's squared-norm buffer on ``device`` (one per device when a model spans several)."""
        task = _graph_task_id()
        if self._cur and task != self._task and not self._recomputing:
            # The backward pass that started these sums raised (e.g. out of memory, batch skipped)
            # and never ran its end callback: drop its partial sums instead of merging them here.
            self._cur, self._fresh, self._fired = {}, [], {}
        if not self._cur:
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        buf = self._cur.get(device)
        if buf is None:
            buf = self._cur[device] = torch.zeros(len(self.names), dtype=torch.float32, device=device)
        return buf

    def _end_pass(self) -> None:
        by_device: dict[torch.device, list[tuple[torch.Tensor, int]]] = {}
        for param, block in self._fresh:
            if param.grad is not None:
                by_device.setdefault(param.grad.device, []).append((param.grad, block))
            else:
                self._mark_invalid(block, "the gradient of its trainable parameters was not stored in .grad "
                                          "(torch.autograd.grad, or a hook that frees it); score with "
                                          "loss.backward()")
        for device, fresh in by_device.items():
            self._kernels[0]([g for g, _ in fresh], [b for _, b in fresh], self._begin_pass(device))
        buffers = list(self._cur.values())
        cur = buffers[0]
        for other in buffers[1:]:
            cur.add_(other.to(cur.device, non_blocking=True))
        for block in self._registered.difference(self._fired) | self._unreachable:
            self._notes.setdefault(
                block,
                "the backward pass did not reach it (a backward cut below the trained blocks, or a detached "
                "hidden state)",
            )
            cur[block:block + 1].fill_(math.nan)
        for entry in self._waiting_dy:
            self._mark_invalid(entry.block, f"gradient checkpointing did not recompute {entry.qualified} in the "
                                            f"backward pass, so its input never came (recomputation stopped early? "
                                            f"torch.utils.checkpoint.set_checkpoint_early_stop(False) keeps it going)")
        for block in self._broken:
            cur[block:block + 1].fill_(math.nan)
        self._warn_not_run()
        self._passes.append(cur)
        self._end_pass_state()

    def _warn_not_run(self) -> None:
        """Warn (once per module) about a module with frozen parameters whose forward never ran in a
        block that did run: if the block uses those parameters through a functional call
        (``F.linear(x, self.proj.weight)``), no hook sees them and their gradient is left out."""
        for b, block in enumerate(self.stack.blocks):
            owners = [(name, module) for name, module in block.named_modules()
                      if any(not p.requires_grad for p in module.parameters(recurse=False))]
            if not any(id(module) in self._ran for _, module in owners):
                continue
            for name, module in owners:
                qualified = f"{self.names[b]}.{name}"
                if id(module) not in self._ran and qualified not in self._warned_not_run:
                    self._warned_not_run.add(qualified)
                    warnings.warn(
                        f"laet_fast: {qualified} ({type(module).__name__}) has frozen parameters but its forward did "
                        f"not run in this pass, so they count as zero in the gradient norm of {self.names[b]}. "
                        f"Right if it was unused (e.g. an expert no token was routed to); if the block uses its "
                        f"weights through a functional call, make them trainable while scoring.",
                        stacklevel=2,
                    )

    def _fired_from(self, block: int, generation: int) -> None:
        """Note that a frozen layer of ``block`` saved in forward pass ``generation`` got its dY."""
        if self._pass_generation is None:
            self._pass_generation = generation
        generations = self._fired.setdefault(block, set())
        generations.add(generation)
        if len(generations) == 2:
            # Two forwards, one backward (loss1 + loss2): each frozen weight's gradient is a sum
            # over the forwards, whose norm the per-forward terms cannot give.
            self._mark_invalid(block, "its frozen layers got gradients from several forward passes in one backward "
                                      "pass (e.g. loss1 + loss2), so their norm cannot be formed exactly; run one "
                                      "backward per forward while scoring")

    def _mark_invalid(self, block: int, note: str) -> None:
        self._notes.setdefault(block, note)
        self._broken.add(block)

    def _end_pass_state(self) -> None:
        self._cur: dict[torch.device, torch.Tensor] = {}
        self._task = -1  # autograd graph task whose end callback will close ``_cur``
        self._fresh: list[tuple[torch.Tensor, int]] = []
        self._registered: set[int] = set()
        self._fired: dict[int, set[int]] = {}
        self._unreachable: set[int] = set()
        self._broken: set[int] = set()
        self._ran: set[int] = set()
        self._pass_generation: int | None = None  # the forward pass this backward pass goes through
        self._waiting_dy: set[_Inputs] = set()

    # ------------------------------------------------------------------ results
    def _squared_history(self) -> torch.Tensor | None:
        """[passes, blocks] float64 CPU tensor of squared norms, after the non-finite check."""
        if not self._passes:
            warnings.warn(
                "laet_fast: no backward pass was recorded, so every gradient norm is NaN; run loss.backward() "
                "while the recorder is attached.",
                stacklevel=3,
            )
            return None
        squared = torch.stack([p.to("cpu", torch.float64) for p in self._passes])
        bad = (~torch.isfinite(squared)).any(0).tolist()
        for block, is_bad in enumerate(bad):
            if is_bad:
                reason = self._notes.get(block, "NaN or Inf in its gradient")
                warnings.warn(
                    f"laet_fast: the gradient norm of layer {block} ({self.names[block]}) is not finite: {reason}; "
                    f"its score is marked non-finite.",
                    stacklevel=3,
                )
        return squared

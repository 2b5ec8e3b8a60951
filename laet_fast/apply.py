"""Apply a layer Selection to a model: train the selected blocks, freeze (and optionally quantize) the rest.

``apply_selection`` does four things, in place:

1. the selected blocks become trainable in the training dtype;
2. every other block is frozen, and with ``quantize_frozen`` its linear layers become bitsandbytes
   4-bit / 8-bit layers (blocks that were ever trained are never quantized: their updates stay exact);
3. embeddings, the final norm and the LM head are frozen; task heads (``score``, ``classifier``,
   ``train_extra``) stay trainable;
4. the backward pass is cut at the lowest selected block: forward pre-hooks detach the hidden state
   entering that block and every block below it, so no block below keeps activations for backward
   and the backward pass never enters them.

It can be called again with another selection (dynamic reselection); the options and the set of
blocks ever trained are kept on the model in ``model._laet_fast``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .layers import find_layers
from .names import OPTIMIZERS
from .quantize import (dequantize_linears, keep_plain_layout, mode_name, quant_modes, quant_state_tensors,
                       quantize_linears, require_bitsandbytes)
from .selection import Selection

STATE_ATTR = "_laet_fast"
TASK_HEAD_NAMES = ("score", "classifier")
GROUPS = ("embeddings", "trained blocks", "frozen blocks", "norm/head", "task head")
# Written into an export folder: how its frozen blocks were exported (as loaded, or dequantized and why).
EXPORT_FILE = "laet_export.json"


@dataclass
class _ApplyState:
    """What ``apply_selection`` keeps on the model between calls."""

    layers_path: str
    quantize: str | None
    dtype: torch.dtype
    train_extra: tuple[str, ...]
    selection: Selection
    ever_trained: set[int] = field(default_factory=set)
    cut_hooks: list = field(default_factory=list)
    cut_suspended: int = 0
    # Set at every forward by block 0's hook: a trained parameter below the blocks needs the backward pass.
    input_needs_backward: bool = False


@dataclass
class ApplyReport:
    """Memory of each parameter group before and after ``apply_selection``.

    Attributes:
        groups: group name -> (bytes before, bytes after). Bytes count parameters, buffers and
            bitsandbytes quantization state (scales, code tables), each storage once.
        trainable_params: number of parameters with ``requires_grad`` after the call.
        total_params: number of parameters of the model (a 4-bit weight counts as the matrix it stands for).
        selection, quantize, dtype: what was applied.
    """

    groups: dict[str, tuple[int, int]]
    trainable_params: int
    total_params: int
    selection: Selection
    quantize: str | None
    dtype: torch.dtype

    @property
    def bytes_before(self) -> int:
        return sum(before for before, _ in self.groups.values())

    @property
    def bytes_after(self) -> int:
        return sum(after for _, after in self.groups.values())

    def __str__(self) -> str:
        def mib(n: int) -> str:
            for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if n >= size:
                    return f"{n / size:10.2f} {unit}"
            return f"{n:10d} B  "

        width = max(len(g) for g in list(self.groups) + ["total"])
        lines = [
            f"{self.selection} -> dtype {str(self.dtype).replace('torch.', '')}, frozen blocks: "
            f"{self.quantize or 'not quantized'}",
            f"{'group':<{width}}  {'before':>14}  {'after':>14}",
        ]
        for name, (before, after) in self.groups.items():
            lines.append(f"{name:<{width}}  {mib(before)}  {mib(after)}")
        lines.append(f"{'total':<{width}}  {mib(self.bytes_before)}  {mib(self.bytes_after)}")
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines.append(f"trainable parameters: {self.trainable_params:,} ({share:.2f}% of {self.total_params:,})")
        return "\n".join(lines)


def logical_numel(param: torch.Tensor) -> int:
    """Element count of the matrix a parameter stands for (a packed 4-bit weight holds two per byte)."""
    quant_state = getattr(param, "quant_state", None)
    return math.prod(quant_state.shape) if quant_state is not None else param.numel()


def applied_state(model: nn.Module) -> _ApplyState | None:
    return getattr(model, STATE_ATTR, None)


def _default_dtype(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return torch.bfloat16 if param is not None and param.device.type == "cuda" else torch.float32


def _task_head_paths(model: nn.Module, train_extra: Iterable[str], layers_path: str) -> list[str]:
    """Dotted paths of the task heads: ``score`` / ``classifier`` modules outside the blocks, plus ``train_extra``."""
    modules = dict(model.named_modules())
    paths = [name for name in modules if name.rsplit(".", 1)[-1] in TASK_HEAD_NAMES
             and not name.startswith(layers_path + ".")]
    for path in train_extra:
        if path not in modules:
            raise ValueError(f"train_extra names {path!r}, which is not a module of {type(model).__name__}; "
                             f"pass dotted module paths as printed by model.named_modules().")
        if path == layers_path or path.startswith(layers_path + "."):
            raise ValueError(f"train_extra names {path!r}, which is inside the transformer blocks; select the "
                             f"block in the Selection instead.")
        paths.append(path)
    # Drop paths nested in another listed path, so that each parameter is claimed once.
    return [p for p in paths if not any(p != q and p.startswith(q + ".") for q in paths)]


def _under(name: str, prefixes: Iterable[str]) -> str | None:
    for prefix in prefixes:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def _classifier(model: nn.Module, layers_path: str, trained: set[int], head_paths: list[str]):
    """A function mapping a parameter / module name to its report group."""
    embedding_names = {name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}

    def group(name: str) -> str:
        if name.startswith(layers_path + "."):
            index = int(name[len(layers_path) + 1:].split(".", 1)[0])
            return "trained blocks" if index in trained else "frozen blocks"
        if _under(name, head_paths):
            return "task head"
        owner = name.rsplit(".", 1)[0]
        if owner in embedding_names or any("emb" in part.lower() for part in owner.split(".")):
            return "embeddings"  # token / position embeddings, their norm (BERT), rotary tables
        return "norm/head"

    return group


def _model_tensors(model: nn.Module):
    """Yield (owner name, tensor) for every parameter, buffer and bitsandbytes quantization state tensor.

    Parameters shared between modules (tied embeddings) appear once, under their first name.
    """
    for name, param in model.named_parameters():
        yield name, param
    for name, buffer in model.named_buffers():
        yield name, buffer
    for name, module in model.named_modules():
        for tensor in quant_state_tensors(module):
            yield f"{name}.quant_state", tensor


def _group_bytes(model: nn.Module, group) -> dict[str, int]:
    sizes = dict.fromkeys(GROUPS, 0)
    seen = set()
    for name, tensor in _model_tensors(model):
        key = (tensor.data_ptr(), tensor.nbytes)
        if key in seen:
            continue
        seen.add(key)
        sizes[group(name)] += tensor.nbytes
    return sizes


def _reaches_trained_parameter(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s autograd graph reaches a trainable ``nn.Parameter``.

    Called on the hidden state entering block 0, whose graph holds only what runs below the blocks
    (embeddings, their projections and norms), so the walk is short. A tensor made to require grad by
    ``enable_input_require_grads`` is a plain leaf, not a parameter, and does not count.
    """
    pending, seen = [tensor.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(getattr(node, "variable", None), nn.Parameter):
            return True
        pending.extend(next_node for next_node, _ in node.next_functions)
    return False


def _cut_hook(state: _ApplyState, index: int, lowest: int):
    """Forward pre-hook detaching the hidden state that enters block ``index`` (at or below ``lowest``).

    Block 0's hook first checks whether a trained parameter feeds the blocks (trained token or position
    embeddings, an LM head tied to them, an input projection); then no block cuts in this forward, since
    the backward pass has to run through all of them to reach it.

    On the lowest selected block the detached hidden state is made a leaf that requires grad when the
    block is gradient-checkpointed in training: HF's reentrant checkpointing only backpropagates into a
    block whose input requires grad (the reason for ``enable_input_require_grads``); the backward pass
    still stops at that leaf.
    """

    def hook(module, args, kwargs):
        if state.cut_suspended:
            return None
        hidden = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
        if not torch.is_tensor(hidden):
            return None
        if index == 0:
            state.input_needs_backward = hidden.requires_grad and _reaches_trained_parameter(hidden)
        if state.input_needs_backward:
            return None
        needs_grad = (index == lowest and torch.is_grad_enabled() and module.training
                      and getattr(module, "gradient_checkpointing", False))
        cut = hidden.detach().requires_grad_(needs_grad and hidden.is_floating_point())
        if args and torch.is_tensor(args[0]):
            return (cut, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": cut}

    return hook


@contextlib.contextmanager
def suspend_backward_cut(model: nn.Module):
    """Let gradients flow into the blocks below the lowest selected one while inside this block.

    Used to score frozen blocks by their gradient norms. A model without a selection applied is
    left as it is. Nests.
    """
    state = applied_state(model)
    if state is None:
        yield model
        return
    state.cut_suspended += 1
    try:
        yield model
    finally:
        state.cut_suspended -= 1


def _set_cut(state: _ApplyState, blocks: nn.ModuleList, lowest: int) -> None:
    """Move the backward cut to block ``lowest`` (``len(blocks)`` cuts below every block)."""
    for handle in state.cut_hooks:
        handle.remove()
    state.cut_hooks = []
    for index in range(min(lowest + 1, len(blocks))):
        hook = _cut_hook(state, index, lowest)
        state.cut_hooks.append(blocks[index].register_forward_pre_hook(hook, with_kwargs=True))


def _cast_floating(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters in place (the Parameter objects stay, so ties and hooks survive)."""
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _as_selection(selection, num_layers: int) -> Selection:
    if isinstance(selection, Selection):
        selection.check_model(num_layers)
        bad = [i for i in selection.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"Selection indices {bad} are out of range for a model with {num_layers} layers "
                             f"(valid: 0..{num_layers - 1}).")
        return selection
    if isinstance(selection, (Sequence, set, frozenset)) and not isinstance(selection, str):
        return Selection(layers=tuple(selection), num_layers=num_layers)
    raise TypeError(f"selection must be a Selection or a list of block indices, not {type(selection).__name__}.")


def apply_selection(
    model: nn.Module,
    selection: Selection | Sequence[int],
    quantize_frozen: str | None = None,
    train_extra: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    layers: str | None = None,
) -> ApplyReport:
    """Make the selected blocks of ``model`` trainable and freeze (optionally quantize) everything else, in place.

    Args:
        model: a transformers model (causal LM, sequence classification, encoder...).
        selection: a :class:`~laet_fast.Selection` for this model's number of blocks, or a list of block indices.
        quantize_frozen: None (or ``"none"``), ``"nf4"``, ``"fp4"`` or ``"int8"``, in any casing: replace the
            linear layers of frozen blocks by bitsandbytes layers (4-bit matmuls run in the training dtype). A
            block that was ever trained is never quantized. On a later call, None keeps the mode of the first call.
        train_extra: dotted paths of further modules to train (e.g. ``"model.norm"``); ``score`` and
            ``classifier`` heads are trained anyway. Empty on a later call keeps the previous ones.
        dtype: training dtype of the selected blocks; the model's floating-point weights are brought to it
            on the first call so that activations flow in one dtype. Default: bfloat16 on CUDA, float32 on CPU.
        layers: dotted path of the block list, if :func:`~laet_fast.find_layers` cannot find it.

    Returns:
        An :class:`ApplyReport` (bytes per parameter group before/after, trainable parameter count).

    Raises:
        ValueError: the selection does not fit the model, an unknown ``quantize_frozen``, or options that
            contradict an earlier call / the model's existing quantization.
        ImportError: quantization needs bitsandbytes and it cannot be imported.
    """
    try:
        quantize_frozen = mode_name(quantize_frozen)
    except ValueError as err:
        raise ValueError(f"quantize_frozen: {err}") from None
    state = applied_state(model)
    stack = find_layers(model, layers if layers is not None else (state.layers_path if state else None))
    selection = _as_selection(selection, len(stack))
    if not selection.layers:
        warnings.warn(f"apply_selection: the selection is empty, so all {len(stack)} blocks are frozen and only "
                      f"train_extra / task heads (if any) train.", stacklevel=2)

    if state is not None:
        if quantize_frozen is not None and quantize_frozen != state.quantize and state.quantize is not None:
            raise ValueError(f"This model's frozen blocks are already quantized as {state.quantize!r}; "
                             f"quantize_frozen={quantize_frozen!r} would mix formats. Keep {state.quantize!r} "
                             f"(or pass None), or start again from an unquantized model.")
        if dtype is not None and dtype != state.dtype:
            raise ValueError(f"The selection was first applied with dtype {state.dtype}; re-applying with {dtype} "
                             f"would re-round trained weights. Pass dtype=None or {state.dtype}.")
        quantize = quantize_frozen or state.quantize
        dtype = state.dtype
        train_extra = tuple(train_extra) or state.train_extra
    else:
        quantize = quantize_frozen
        dtype = dtype or _default_dtype(model)
        train_extra = tuple(train_extra)

    existing = quant_modes(model)
    if quantize is not None and existing - {quantize}:
        raise ValueError(f"The model already holds {'/'.join(sorted(existing))} quantized layers; "
                         f"quantize_frozen={quantize!r} would mix formats. Pass quantize_frozen="
                         f"{sorted(existing)[0]!r} or load the model unquantized.")
    if quantize is not None or existing:
        require_bitsandbytes()

    head_paths = _task_head_paths(model, train_extra, stack.path)
    before = _group_bytes(model, _classifier(model, stack.path, set(selection.layers), head_paths))

    if state is None:
        _cast_floating(model, dtype)
        state = _ApplyState(stack.path, quantize, dtype, train_extra, selection)
        setattr(model, STATE_ATTR, state)
    state.quantize, state.train_extra, state.selection = quantize, train_extra, selection

    for param in model.parameters():
        param.requires_grad_(False)
    for index, block in enumerate(stack):
        if index in selection:
            if quant_modes(block):
                dequantize_linears(block, dtype)
            _cast_floating(block, dtype)
            for param in block.parameters():
                param.requires_grad_(param.is_floating_point())
            state.ever_trained.add(index)
        elif quantize is not None and index not in state.ever_trained:
            quantize_linears(block, quantize, compute_dtype=dtype)
    keep_plain_layout(model)  # 4-bit layers the model came with, too (see laet_fast.quantize)
    modules = dict(model.named_modules())
    for path in head_paths:
        _cast_floating(modules[path], dtype)
        for param in modules[path].parameters():
            param.requires_grad_(param.is_floating_point())

    lowest = selection.lowest if selection.lowest is not None else len(stack)
    _set_cut(state, stack.blocks, lowest)

    after = _group_bytes(model, _classifier(model, stack.path, set(selection.layers), head_paths))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return ApplyReport({g: (before[g], after[g]) for g in GROUPS}, trainable, total, selection, quantize, dtype)


def export_model(model: nn.Module, path: str | None = None, tokenizer=None, source: str | None = None) -> nn.Module:
    """Turn a model prepared by :func:`apply_selection` back into a plain transformers model, in place.

    Trained blocks keep their weights as trained. Frozen blocks that ``quantize_frozen`` quantized get
    their weights as loaded, read again from the model's source one tensor at a time (see
    ``laet_fast.frozen_source``), bit for bit in the training dtype. Where the source cannot be read (an
    in-memory model, a moved folder) they are dequantized (their quantization error stays), one warning
    says so and ``laet_export.json`` records it. Layers quantized on load are dequantized. laet_fast's hooks
    and state are removed and every parameter requires grad again, as after ``from_pretrained``.

    Args:
        model: the model given to ``apply_selection`` (a transformers model, or a module holding one such
            as a ``TaskModel``), changed in place.
        path: if given, a new or empty folder, or an earlier export (which is replaced), to write a complete
            transformers model to: the weights and the config (for a model loaded from GGUF, the config
            transformers derived from it, without the GGUF quantizer) with ``save_pretrained``, the tokenizer,
            and ``laet_export.json`` (how the frozen blocks were exported). It is written beside ``path`` and
            renamed into place when complete, so ``path`` is the complete export or, after a kill, absent or
            the one before.
        tokenizer: the model's tokenizer, saved in ``path``. Without one the folder cannot be tokenized
            from (``laet-fast score --model path`` fails), so a warning says so.
        source: the save_pretrained folder or .gguf file the model was loaded from (default: the folder
            transformers recorded as ``name_or_path``).

    Returns:
        ``model``.

    Raises:
        ValueError: ``path`` is an existing file, or a folder holding files that is not an earlier export.
    """
    from .frozen_source import pretrained_within, restore_frozen

    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"export_model: {path} is an existing file; give a folder path (a new folder, or one "
                         f"holding an earlier export, which is replaced).")
    if path is not None and os.path.isdir(path) and os.listdir(path) and not os.path.isfile(
            os.path.join(path, EXPORT_FILE)):
        raise ValueError(f"export_model: {path} holds files but no {EXPORT_FILE}, so it is not an earlier export "
                         f"to replace; give a new or empty folder.")
    state = applied_state(model)
    dtype = state.dtype if state is not None else None
    frozen = restore_frozen(model, dtype, source)
    if not frozen.lossless:
        warnings.warn(f"export_model: {len(frozen.dequantized)} linear layers of the frozen blocks hold "
                      f"{frozen.quantized}-rounded weights, not the weights as loaded: {frozen.reason}. Pass source= "
                      f"the folder or .gguf file the model was loaded from"
                      + (f"; {EXPORT_FILE} records it." if path is not None else "."), stacklevel=2)
    if quant_modes(model):
        dequantize_linears(model, dtype)
    if state is not None:
        for handle in state.cut_hooks:
            handle.remove()
        delattr(model, STATE_ATTR)
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())
    pretrained = pretrained_within(model)
    _forget_dequantized_gguf(pretrained)
    if path is not None:
        from . import atomic

        with atomic.folder(path) as staging:
            pretrained.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            with open(os.path.join(staging, EXPORT_FILE), "w", encoding="utf-8") as handle:
                json.dump({"format": "laet_fast.export", "version": 1, "frozen_blocks": frozen.to_dict()}, handle,
                          indent=1)
        if tokenizer is None:
            warnings.warn(f"export_model: no tokenizer given, so {path} holds the model but no tokenizer; pass "
                          f"tokenizer= to make it a complete transformers model.", stacklevel=2)
    return model


def _forget_dequantized_gguf(model: nn.Module) -> None:
    """Drop transformers' GGUF quantizer once every weight is a plain floating-point tensor.

    transformers dequantizes GGUF weights on load but keeps its GGUF quantizer on the model, and
    ``save_pretrained`` refuses any model whose quantizer is not serialisable.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return
    if not all(p.is_floating_point() for p in model.parameters()):
        return
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-4, weight_decay: float = 0.0, **kwargs):
    """An AdamW optimizer over exactly the trainable parameters of ``model``.

    Args:
        name: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw8bit"`` (``bnb.optim.AdamW8bit``: 8-bit moments).
        lr, weight_decay: as in AdamW; weight decay applies to matrices only (not to biases and norm
            weights, which are 1-D).
        **kwargs: passed to the optimizer (betas, eps...).

    Call it again after a re-selection: the trainable parameters change.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; apply a non-empty selection first.")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    bnb = require_bitsandbytes()
    return bnb.optim.AdamW8bit(groups, lr=lr, **kwargs)

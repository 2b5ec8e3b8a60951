"""LayerProbe: per-block statistics of the hidden states, gathered with hooks during forward passes."""
from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn as nn

from .grad_norms import in_backward
from .layers import find_layers
from .scores import LayerScores


def _mask_position(model: nn.Module) -> int | None:
    """Index of ``attention_mask`` among the positional parameters of ``model.forward``, if any.

    The position differs between architectures (second for Llama/BERT/OPT, third for GPT-2 and
    Falcon, whose second parameter is ``past_key_values``), so it is read from the signature.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for index, param in enumerate(positional):
        if param.name == "attention_mask":
            return index
    return None


def first_tensor(value):
    """A block returns a tensor, a tuple whose first element is the hidden states, or a ModelOutput."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    to_tuple = getattr(value, "to_tuple", None)
    if to_tuple is not None:
        items = to_tuple()
        if items and isinstance(items[0], torch.Tensor):
            return items[0]
    return None


def _rows(hidden_states: torch.Tensor, hidden: int) -> torch.Tensor:
    """[..., hidden] -> [tokens, hidden], detached, with the hidden dim contiguous (as the kernel needs)."""
    rows = hidden_states.detach().reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class LayerProbe:
    """Context manager that scores every transformer block from the forward passes run inside it.

    For each block ``i`` and each real (non-padding) token, with ``x`` the hidden state entering
    the block and ``y`` the one leaving it, the probe accumulates on the device (no host sync):
    the token count, ``cos(x, y)``, ``|y - x| / |x|``, ``sum(y**2)`` and ``max |y|``, through the
    fused ``laet_fast.kernels.hidden_stats`` kernel. ``scores()`` turns them into
    ``block_influence = 1 - mean cos`` (ShortGPT), ``relative_change``, ``act_rms``, ``act_absmax``.

    Real tokens are those where the ``attention_mask`` passed to the model's forward is 1 (all
    tokens when no mask is passed). Statistics add up over all passes inside the context,
    weighted by token count, until ``reset()``.

    Args:
        model: a transformers model (or a PEFT wrapper of one).
        layers: dotted path of the block list, to skip discovery (see ``find_layers``).
        grad_norms: also record per-block gradient norms of the parameters during backward
            passes (``laet_fast.grad_norms.GradNormRecorder``); adds ``grad_norm`` and
            ``grad_norm_sq`` to the scores and ``history["grad_norm"]``, one row per backward.

    Example::

        with LayerProbe(model) as probe, torch.no_grad():
            for batch in batches:
                model(**batch)
        print(probe.scores())
    """

    def __init__(self, model: nn.Module, layers: str | None = None, grad_norms: bool = False):
        self.model = model
        self.stack = find_layers(model, layers)
        self.grad_norms = bool(grad_norms)
        self._mask_index = _mask_position(model)
        self._handles: list = []
        self._recorder = None
        # One [num_layers, len(STAT_FIELDS)] float32 buffer per device the blocks run on (a single
        # one unless the model is split across devices); created on the first block call.
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._hidden_sizes: list[int | None] = [None] * len(self.stack)
        self._mask: torch.Tensor | None = None
        self._mask_on: dict[torch.device, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        return self.stack.names

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # Hooks.
    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_index is not None and len(args) > self._mask_index:
            mask = args[self._mask_index]
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError(
                f"LayerProbe: attention_mask must be a tensor of shape [batch, seq], got {type(mask).__name__}."
            )
        self._mask = mask
        self._mask_on = {}

    def _release_mask(self, module, args, kwargs, output):
        self._mask = None
        self._mask_on = {}

    def _token_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask
        if mask is None:
            return None
        if mask.dim() != 2 or hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"LayerProbe: attention_mask has shape {tuple(mask.shape)} but the hidden states entering the "
                f"blocks have shape {tuple(hidden.shape)}; the probe needs a [batch, seq] padding mask matching "
                f"them (1 = real token). Pass a 2-D mask, and run full forward passes (no KV cache, "
                f"use_cache=False) inside the probe."
            )
        flat = self._mask_on.get(hidden.device)
        if flat is None:
            flat = mask.detach().to(hidden.device, non_blocking=True).reshape(-1)
            if flat.is_floating_point():
                flat = flat != 0
            self._mask_on[hidden.device] = flat
        return flat

    def _buffer(self, device: torch.device) -> torch.Tensor:
        from .kernels.hidden_stats import new_stats_buffer

        buf = self._buffers.get(device)
        if buf is None:
            # A normal tensor even when the first pass runs under torch.inference_mode(): an inference
            # tensor could not be updated by later passes outside it, nor zeroed by reset().
            with torch.inference_mode(False):
                buf = new_stats_buffer(len(self.stack), device)
            self._buffers[device] = buf
        return buf

    def _block_hook(self, index: int):
        from .kernels.hidden_stats import accumulate_hidden_stats

        def hook(module, args, kwargs, output):
            # Reentrant gradient checkpointing re-runs the blocks, hooks included, inside the backward
            # pass: those recomputed calls must not be counted a second time.
            if in_backward():
                return
            h_in = args[0] if args else kwargs.get("hidden_states")
            h_out = first_tensor(output)
            if not isinstance(h_in, torch.Tensor) or h_out is None:
                raise ValueError(
                    f"LayerProbe: block {self.stack.names[index]} ({type(module).__name__}) was not called with the "
                    f"hidden states as first argument or returned no tensor; pass layers= to point the probe at "
                    f"the transformer blocks."
                )
            if h_in.shape != h_out.shape:
                raise ValueError(
                    f"LayerProbe: block {self.stack.names[index]} maps hidden states of shape {tuple(h_in.shape)} "
                    f"to {tuple(h_out.shape)}; the probe compares what enters and leaves a residual block, which "
                    f"must have the same shape."
                )
            hidden = h_in.shape[-1]
            mask = self._token_mask(h_in)
            self._hidden_sizes[index] = hidden
            with torch.no_grad():
                acc = self._buffer(h_out.device)[index]
                accumulate_hidden_stats(_rows(h_in, hidden), _rows(h_out, hidden), mask, acc)

        return hook

    # Life cycle.
    def attach(self) -> "LayerProbe":
        """Install the hooks (``__enter__`` does this); ``detach`` removes them."""
        if self._handles:
            raise RuntimeError("LayerProbe is already attached; a probe can be entered once at a time.")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
            self._handles.append(
                self.model.register_forward_hook(self._release_mask, with_kwargs=True, always_call=True)
            )
            for index, block in enumerate(self.stack):
                self._handles.append(block.register_forward_hook(self._block_hook(index), with_kwargs=True))
            if self.grad_norms:
                if self._recorder is None:
                    from .grad_norms import GradNormRecorder

                    self._recorder = GradNormRecorder(self.model, self.stack)
                self._recorder.attach()
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook; the accumulated statistics are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mask = None
        self._mask_on = {}
        if self._recorder is not None:
            self._recorder.detach()

    def __enter__(self) -> "LayerProbe":
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.detach()

    def reset(self) -> None:
        """Clear the accumulated statistics (and recorded gradient norms)."""
        for buf in self._buffers.values():
            buf.zero_()
        if self._recorder is not None:
            self._recorder.reset()

    # Results.
    def _merged_stats(self) -> torch.Tensor:
        """The [num_layers, fields] statistics on the CPU, summed over devices (max for absmax)."""
        from .kernels.hidden_stats import STAT_FIELDS, new_stats_buffer

        total = new_stats_buffer(len(self.stack), torch.device("cpu"))
        absmax = STAT_FIELDS.index("absmax")
        for buf in self._buffers.values():
            part = buf.detach().to("cpu", torch.float32)
            summed = [f for f in range(len(STAT_FIELDS)) if f != absmax]
            total[:, summed] += part[:, summed]
            total[:, absmax] = torch.maximum(total[:, absmax], part[:, absmax])
        return total

    def scores(self) -> LayerScores:
        """The scores of every block so far (one host sync). NaN for a block that saw no tokens.

        Under ``torch.distributed`` (more than one rank) the statistics and gradient norms of every
        rank are summed first (``laet_fast.distributed``), so all ranks get the scores of the global
        batch: call it on every rank.
        """
        from .distributed import all_reduce_hidden_stats
        from .kernels.hidden_stats import STAT_FIELDS, hidden_stats_metrics

        stats = all_reduce_hidden_stats(self._merged_stats())
        num_layers = len(self.stack)
        metrics: dict[str, list[float]] = {}
        groups: dict[int, list[int]] = {}
        for index, size in enumerate(self._hidden_sizes):
            groups.setdefault(size or 1, []).append(index)
        for size, rows in groups.items():
            values = hidden_stats_metrics(stats[rows], size)
            for metric, tensor in values.items():
                column = metrics.setdefault(metric, [math.nan] * num_layers)
                for row, value in zip(rows, tensor.tolist()):
                    column[row] = float(value)
        tokens = stats[:, STAT_FIELDS.index("tokens")]
        history = {}
        if self._recorder is not None:
            metrics.update({k: [float(v) for v in vals] for k, vals in self._recorder.metrics().items()})
            history["grad_norm"] = self._recorder.history()
        num_tokens = int(tokens.max().item())
        if num_tokens == 0:
            warnings.warn("LayerProbe.scores: the probe saw no tokens (no forward pass inside it, or every "
                          "attention_mask entry was 0), so every forward statistic is NaN.", stacklevel=2)
        return LayerScores(metrics, self.stack.names, num_tokens=num_tokens, history=history)

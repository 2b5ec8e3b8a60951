"""Give quantized frozen blocks back their weights as loaded, read again from the model's source.

``apply_selection(..., quantize_frozen=...)`` rounds the frozen blocks' linear weights to 4 or 8
bits; dequantizing them at export would hand the user rounded base weights. Instead each such
layer gets its weight from the source again, one tensor at a time, converted as loading did:

* a save_pretrained safetensors folder: the stored tensor (``merge.checkpoint.Checkpoint`` reads
  one at a time), cast to the dtype the model was loaded in (``config.dtype``), then to the
  training dtype, as ``from_pretrained`` and ``apply_selection`` cast it;
* a GGUF file: "as loaded" is transformers' own dequantization (its GGUF reader or legacy
  converter, renames and Llama's q/k permutation undone, cast to the load dtype), private code
  that changes between releases. The file is loaded again with ``from_pretrained`` exactly as the
  first time (same class, config and dtype), so this source costs a second copy of the model in
  memory, released after the copy.

Every restored weight is checked: quantized again as ``quantize_linears`` did, it must give the
layer's quantized weight bit for bit. A weight that fails (the source changed since loading, a
name transformers renamed) keeps its dequantized value, and the result says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .quantize import dequantize_linear, quant_mode, quantized_by_laet_fast, same_quantization


@dataclass
class FrozenExport:
    """How the quantized frozen blocks' weights were exported.

    Attributes:
        quantized: the quantization mode of the frozen blocks (None: nothing was quantized).
        source: the folder or .gguf file read again (None: none could be found).
        restored: layers (dotted names) that got their weights as loaded.
        dequantized: layers that kept their dequantized weights; ``reason`` says why.
    """

    quantized: str | None = None
    source: str | None = None
    restored: list[str] = field(default_factory=list)
    dequantized: list[str] = field(default_factory=list)
    reason: str | None = None

    @property
    def lossless(self) -> bool:
        return not self.dequantized

    def to_dict(self) -> dict:
        return {"quantized": self.quantized, "weights": "as loaded" if self.lossless else "dequantized",
                "source": self.source, "restored_layers": len(self.restored),
                "dequantized_layers": self.dequantized, "reason": self.reason}


def pretrained_within(model: nn.Module) -> nn.Module:
    """The transformers model in ``model``: itself, or the first submodule that is one (a ``TaskModel``'s);
    ``model`` itself when it holds none."""
    from transformers import PreTrainedModel

    return next((module for module in model.modules() if isinstance(module, PreTrainedModel)), model)


def find_source(pretrained: nn.Module, path: str | None = None) -> tuple[str | None, str]:
    """(the safetensors folder or .gguf file to read ``pretrained``'s weights from, or None; why not, when None).

    ``path`` defaults to the folder transformers recorded (``name_or_path``); it records no GGUF file
    name, so a folder holding no safetensors weights and exactly one ``.gguf`` file gives that file.
    """
    from .merge.checkpoint import INDEX_FILE, SINGLE_FILE

    path = str(path if path is not None else getattr(pretrained, "name_or_path", "") or "")
    if not path:
        return None, "the model was not loaded from a path (an in-memory model)"
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return path, ""
    if not os.path.isdir(path):
        return None, f"its source {path} is not a local folder or .gguf file"
    if any(os.path.isfile(os.path.join(path, name)) for name in (SINGLE_FILE, INDEX_FILE)):
        return path, ""
    ggufs = sorted(name for name in os.listdir(path) if name.lower().endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(path, ggufs[0]), ""
    what = "no safetensors weights or .gguf file" if not ggufs else f"{len(ggufs)} .gguf files"
    return None, f"its source folder {path} holds {what}"


class _Safetensors:
    """A save_pretrained folder's tensors by the model's parameter names, one at a time."""

    def __init__(self, folder: str, pretrained: nn.Module):
        from .merge.checkpoint import Checkpoint

        self.checkpoint = Checkpoint(folder)
        self.prefix = getattr(pretrained, "base_model_prefix", "") or ""

    def read(self, name: str) -> torch.Tensor | None:
        # A base model saved on its own, or loaded out of a model with a head, differ by the prefix.
        candidates = [name, f"{self.prefix}.{name}"]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1:])
        for candidate in candidates:
            if candidate in self.checkpoint.tensors:
                return self.checkpoint.read(candidate)
        return None


class _Reloaded:
    """A source only transformers can read (GGUF): the model loaded again as the first time, on the CPU."""

    def __init__(self, gguf_path: str, pretrained: nn.Module):
        import copy

        from .loading import shared_gguf_reader

        config = copy.deepcopy(pretrained.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF quantizer that loading set; loading again sets it anew
        with shared_gguf_reader():
            self.model = type(pretrained).from_pretrained(
                os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), config=config, dtype=config.dtype)
        self.tensors = self.model.state_dict()

    def read(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)


def _loaded_dtype(pretrained: nn.Module) -> torch.dtype | None:
    dtype = getattr(getattr(pretrained, "config", None), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def restore_frozen(model: nn.Module, dtype: torch.dtype | None, source: str | None = None) -> FrozenExport:
    """Replace every layer ``quantize_linears`` quantized in ``model`` by its plain layer, in place, with the
    weight as loaded from ``source`` (default: ``find_source``) where it can be read, else dequantized.

    Args:
        model: the model given to ``apply_selection`` (a transformers model or a module holding one).
        dtype: the training dtype, which the restored weights take (None: each layer's bias / quantized dtype).
        source: the save_pretrained folder or .gguf file the model was loaded from.

    Returns:
        A ``FrozenExport`` saying which layers got their weights as loaded and why any did not.
    """
    pretrained = pretrained_within(model)
    layers = [(name, module) for name, module in pretrained.named_modules() if quantized_by_laet_fast(module)]
    result = FrozenExport(quantized=quant_mode(layers[0][1]) if layers else None)
    if not layers:
        return result
    source, reason = find_source(pretrained, source)
    reader = None
    if source is not None:
        try:
            reader = _Reloaded(source, pretrained) if os.path.isfile(source) else _Safetensors(source, pretrained)
            result.source = source
        except Exception as err:  # a source cut or changed since loading fails in any way inside its reader
            reason = f"its source {source} cannot be read ({type(err).__name__}: {err})"
    loaded_dtype = _loaded_dtype(pretrained)
    modules = dict(pretrained.named_modules())
    for name, layer in layers:
        plain = dequantize_linear(layer, dtype)
        try:
            weight = reader.read(f"{name}.weight") if reader is not None else None
        except Exception as err:  # as above: this and every later layer keep their dequantized weights
            reason = reason or f"its source {source} cannot be read ({type(err).__name__}: {err})"
            reader = weight = None
        as_loaded = False
        if weight is not None and tuple(weight.shape) == tuple(plain.weight.shape):
            dequantized = plain.weight
            weight = weight.to(loaded_dtype) if loaded_dtype is not None else weight
            plain.weight = nn.Parameter(weight.to(device=dequantized.device, dtype=dequantized.dtype),
                                        requires_grad=False)
            as_loaded = same_quantization(layer, plain)
            if not as_loaded:
                plain.weight = dequantized
                reason = reason or f"the weight in {source} differs from the one loaded"
        elif reader is not None:
            reason = reason or f"{source} holds no tensor {name}.weight of shape {list(plain.weight.shape)}"
        (result.restored if as_loaded else result.dequantized).append(name)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else pretrained, child, plain)
        del weight
    result.reason = reason or None
    return result

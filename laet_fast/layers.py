"""Find the stack of transformer blocks in a transformers model."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

# Dotted paths of the block stack, relative to the object that holds the backbone.
# Covers Llama/Qwen2/Mistral/Gemma/Phi-3 (model.layers), GPT-2/Falcon (transformer.h),
# GPT-NeoX (gpt_neox.layers), OPT (model.decoder.layers / decoder.layers), BERT-style encoders.
_KNOWN_PATHS = (
    "model.layers",
    "model.model.layers",
    "layers",
    "transformer.h",
    "h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "decoder.layers",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "encoder.layer",
)


@dataclass(frozen=True)
class LayerStack:
    """The transformer blocks of a model and their dotted path, e.g. ``"model.layers"``."""

    path: str
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> nn.Module:
        return self.blocks[index]

    def __iter__(self):
        return iter(self.blocks)

    @property
    def names(self) -> list[str]:
        """The dotted path of each block, e.g. ``["model.layers.0", ...]``."""
        return [f"{self.path}.{i}" for i in range(len(self.blocks))]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: ``y = x @ weight + bias``, weight of shape [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (bitsandbytes layers included, they subclass it) or a GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, str]:
    """PEFT wraps the transformers model as ``base_model.model``; return that and its prefix."""
    prefix = ""
    while type(model).__name__.startswith("Peft") or type(model).__name__ in ("LoraModel", "IA3Model"):
        inner = getattr(model, "base_model", None) if type(model).__name__.startswith("Peft") else None
        if inner is not None:
            model, prefix = inner, prefix + "base_model."
            continue
        inner = getattr(model, "model", None)
        if inner is None:
            break
        model, prefix = inner, prefix + "model."
    return model, prefix


def num_layers_of_config(config) -> int | None:
    """The number of blocks a transformers config declares; None when it names none."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _num_layers(model: nn.Module) -> int | None:
    return num_layers_of_config(getattr(model, "config", None))


def find_layers(model: nn.Module, layers: str | None = None) -> LayerStack:
    """Return the transformer block stack of ``model`` and its dotted path.

    Args:
        model: a transformers model (causal LM, sequence classification, encoder, bare backbone),
            optionally wrapped by PEFT.
        layers: the dotted path of the ``nn.ModuleList`` of blocks, relative to ``model``, to skip
            discovery (e.g. ``"model.layers"``).

    Raises:
        ValueError: no block stack was found, or ``layers`` does not name an ``nn.ModuleList``.
    """
    if layers is not None:
        found = _get(model, layers)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(
                f"layers={layers!r} does not name a non-empty nn.ModuleList of blocks in {type(model).__name__}; "
                f"pass the dotted path of the block list, e.g. layers='model.layers'."
            )
        return LayerStack(layers, found)

    inner, prefix = _unwrap_peft(model)
    expected = _num_layers(inner)
    for path in _KNOWN_PATHS:
        found = _get(inner, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (expected is None or len(found) == expected):
            return LayerStack(prefix + path, found)

    raise ValueError(
        f"laet_fast could not find the transformer blocks of {type(model).__name__}. "
        f"Pass their dotted path explicitly, e.g. find_layers(model, layers='model.layers') "
        f"(or layers= on LayerProbe / the --layers option of the command line)."
    )

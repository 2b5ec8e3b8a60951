"""A ``peft.LoraConfig`` that puts LoRA adapters on the selected blocks only (IR-Tuning's own setting).

PEFT restricts adapters to some blocks with ``layers_to_transform`` (the block indices) and
``layers_pattern`` (the name of the block list in module paths: ``layers`` in ``model.layers.3.mlp``,
``h`` in GPT-2's ``transformer.h.3.attn``). Without a pattern PEFT takes the first ``.<name>.<index>.``
in each module path, which is the block list for every architecture laet_fast knows; with ``model``
the pattern is read from where ``find_layers`` finds the blocks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch.nn as nn

from ..layers import find_layers, is_linear_like
from ..selection import Selection


def block_linear_names(model: nn.Module) -> list[str]:
    """Sorted names (last path component) of the linear layers inside ``model``'s blocks.

    ``nn.Linear`` (bitsandbytes layers included) and GPT-2's ``Conv1D``: what PEFT's ``"all-linear"``
    means inside the blocks (the LM head is outside them).
    """
    names = {name.rsplit(".", 1)[-1] for block in find_layers(model) for name, module in block.named_modules()
             if name and is_linear_like(module)}
    return sorted(names)


def to_peft_config(selection: Selection, r: int = 8, alpha: int = 16, target_modules: Sequence[str] | str | None = None,
                   *, layers_pattern: str | None = None, model: nn.Module | None = None, **kwargs: Any):
    """LoRA on the blocks of ``selection`` only, as a ``peft.LoraConfig`` for ``peft.get_peft_model``.

    Args:
        selection: the chosen blocks (``Selection.layers``, indices into the model's block list).
        r, alpha: LoRA rank and ``lora_alpha``.
        target_modules: module names inside a block (e.g. ``["q_proj", "v_proj"]``); ``"all-linear"`` for
            every linear layer of the blocks (needs ``model``: PEFT refuses a string together with
            ``layers_to_transform``, so the names are listed); None for PEFT's default of the
            architecture (q/v projections for Llama, ``c_attn`` for GPT-2).
        layers_pattern: the name of the block list in module paths (``"layers"``, ``"h"``...); by default
            the last part of ``find_layers(model).path`` when ``model`` is given, else None (PEFT's match).
        model: the model the adapters go on (optional): checks the selection was made for its depth, and
            gives ``layers_pattern`` and the ``"all-linear"`` names.
        **kwargs: further ``LoraConfig`` fields (``lora_dropout``, ``task_type``, ``bias``...).

    Raises:
        ValueError: the selection is empty (PEFT would read an empty ``layers_to_transform`` as every
            block), was made for a model of another depth, or ``target_modules`` is a regular
            expression (which PEFT cannot combine with block indices).
        ImportError: peft is not installed.
    """
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("to_peft_config needs peft: pip install peft (or pip install -e '.[bench]').") from error
    if not len(selection):
        raise ValueError("The selection is empty; PEFT would put adapters on every block. Select at least one layer.")
    if model is not None:
        stack = find_layers(model)
        selection.check_model(len(stack))
        if layers_pattern is None:
            layers_pattern = stack.path.rsplit(".", 1)[-1]
    if target_modules == "all-linear":
        if model is None:
            raise ValueError("target_modules='all-linear' needs model=: PEFT refuses a string with "
                             "layers_to_transform, so the linear layers' names are read from the model.")
        target_modules = block_linear_names(model)
    elif isinstance(target_modules, str):
        raise ValueError(f"target_modules={target_modules!r} is a regular expression, which PEFT cannot combine with "
                         "layers_to_transform; pass a list of module names (e.g. ['q_proj', 'v_proj']) "
                         "or 'all-linear'.")
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=None if target_modules is None else list(target_modules),
                      layers_to_transform=list(selection.layers), layers_pattern=layers_pattern, **kwargs)

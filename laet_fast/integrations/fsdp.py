"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a selection: trained blocks sharded, frozen blocks whole.

``fully_shard`` turns every parameter of the module it wraps into a ``DTensor`` shard, and gathers
it again before each forward. A bitsandbytes 4-bit weight (``Params4bit``) cannot go through that:
its packed bytes come back as a plain tensor without the ``quant_state`` that says how to unpack
them, and the first forward fails with ``ValueError: quant_state is required`` (measured with
torch 2.13 and bitsandbytes 0.50, 2 gloo ranks on CPU). So only the trained blocks are sharded
(their weights, gradients and optimizer state split across ranks); the frozen blocks, NF4 or
not, and the frozen embeddings and head are ``ignored_params`` of the root, and every rank keeps a
whole copy of them. Frozen parameters get no gradient, so they need no reduction either.

The selection is fixed once sharded: a block that joins later would need sharding after the
first forward, and one that leaves would keep DTensor weights. Re-select with DDP instead
(``laet_fast.distributed.rebuild_ddp``).
"""
from __future__ import annotations

import torch.nn as nn

from ..layers import find_layers
from ..quantize import quant_modes
from ..selection import Selection


def fully_shard_selection(model: nn.Module, selection: Selection | None = None, *, mesh=None, layers: str | None = None,
                          **fsdp_kwargs) -> nn.Module:
    """Apply FSDP2 to the trained blocks of ``model`` and to its root, leaving every frozen parameter unsharded.

    Call on every rank after ``apply_selection`` (and after moving the model to its device) and
    before building the optimizer, which must see the sharded parameters.

    Args:
        model: a transformers model on which ``apply_selection`` was called.
        selection: the applied selection, to check against the model (default: the one applied).
        mesh: a 1-D ``DeviceMesh`` (default: FSDP2's, over every rank on the current device type).
        layers: dotted path of the block list, if it is not found automatically.
        **fsdp_kwargs: passed to every ``fully_shard`` call (``reshard_after_forward``, ``mp_policy``...).

    Returns:
        ``model``, whose class is now also an ``FSDPModule`` (sharded in place).

    Raises:
        ValueError: no selection was applied, ``selection`` is not the applied one, or a block to shard
            holds quantized (bitsandbytes) layers.
        NotImplementedError: ``ignored_params`` in ``fsdp_kwargs`` (the frozen parameters are the ignored ones).
    """
    from torch.distributed.fsdp import fully_shard

    if "ignored_params" in fsdp_kwargs:
        raise NotImplementedError("fully_shard_selection passes the frozen parameters as ignored_params itself; "
                                  "freeze a parameter (requires_grad=False) to leave it unsharded.")
    applied = getattr(getattr(model, "_laet_fast", None), "selection", None)
    if applied is None:
        raise ValueError("fully_shard_selection: no selection was applied to this model; call "
                         "apply_selection(model, selection, ...) first.")
    stack = find_layers(model, layers or model._laet_fast.layers_path)
    if selection is not None and tuple(selection.layers) != tuple(applied.layers):
        raise ValueError(f"fully_shard_selection: selection {list(selection.layers)} is not the one applied to the "
                         f"model ({list(applied.layers)}); apply it first.")
    for index in applied.layers:
        if quant_modes(stack[index]):
            raise ValueError(f"block {index} is trained but holds {'/'.join(sorted(quant_modes(stack[index])))} "
                             f"layers, which FSDP cannot shard (quant_state is lost); apply_selection dequantizes "
                             f"trained blocks, so apply the selection again.")
    frozen = {p for p in model.parameters() if not p.requires_grad}
    for index in applied.layers:
        block = stack[index]
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in frozen}, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=frozen, **fsdp_kwargs)
    return model

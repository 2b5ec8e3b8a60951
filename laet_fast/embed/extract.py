"""``layer_embeddings``: the pooled output of every block for every example, in one forward pass per batch."""
from __future__ import annotations

import inspect
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..layers import find_layers
from ..probe import first_tensor
from .embeddings import LayerEmbeddings, fingerprint_texts

# Where the final norm (the one transformers applies to the last entry of ``hidden_states``) sits,
# relative to the module holding the block list: Llama/Qwen/Mistral/Gemma (norm), GPT-2/Falcon (ln_f),
# OPT (final_layer_norm), GPT-NeoX (final_layer_norm), Phi (final_layernorm).
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
# Post-norm encoders: each block ends in its own LayerNorm and hidden_states[-1] is the last block's output.
_NO_FINAL_NORM = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert")


class _StopForward(Exception):
    """Raised by the hook of the highest requested block: nothing above it (nor the LM head) runs."""


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def final_norm_of(model: nn.Module, stack_path: str) -> nn.Module | None:
    """The model's final norm module, or None for a post-norm encoder that has none.

    Raises:
        ValueError: a model that is neither, so that ``final_norm=True`` is never silently skipped.
    """
    holder_path = stack_path.rsplit(".", 1)[0] if "." in stack_path else ""
    for path in dict.fromkeys((holder_path, "")):
        holder = _get(model, path)
        for name in _FINAL_NORM_NAMES:
            module = getattr(holder, name, None)
            if isinstance(module, nn.Module):
                return module
    if getattr(getattr(model, "config", None), "model_type", None) in _NO_FINAL_NORM:
        return None
    raise ValueError(f"final_norm=True: laet_fast found no final norm in {type(model).__name__} (looked for "
                     f"{', '.join(_FINAL_NORM_NAMES)} beside {stack_path}); use final_norm=False.")


def accepts_argument(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _check_layers(layers, num_blocks: int) -> list[int]:
    if layers is None:
        return list(range(num_blocks))
    chosen = sorted({int(i) for i in layers})
    if not chosen or len(chosen) != len(list(layers)) or chosen[0] < 0 or chosen[-1] >= num_blocks:
        raise ValueError(f"layers={list(layers)!r} must be distinct block indices in 0..{num_blocks - 1}.")
    return chosen


def _text_batches(texts: Sequence[str], tokenizer, batch_size: int, max_length: int):
    """(example indices, batch) pairs, longest texts first (less padding), and the example count."""
    if tokenizer is None:
        raise ValueError("layer_embeddings got texts but no tokenizer; pass tokenizer=, or pre-tokenized batches "
                         "(dicts with input_ids and attention_mask).")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; entry {bad[0]} is a {type(texts[bad[0]]).__name__}.")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids, masks = encoded["input_ids"], encoded["attention_mask"]
    empty = [i for i, m in enumerate(masks) if sum(m) == 0]
    if empty:
        raise ValueError(f"text {empty[0]} ({texts[empty[0]]!r}) has no tokens; drop empty texts first.")
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in chunk], "attention_mask": [masks[i] for i in chunk]},
                              return_tensors="pt")
        yield torch.tensor(chunk), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _given_batches(batches: Iterable[dict]):
    start = 0
    for batch in batches:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("each pre-tokenized batch must be a dict with input_ids (and attention_mask), as "
                             "laet_fast.loading.iter_batches yields.")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        yield torch.arange(start, start + ids.shape[0]), {"input_ids": ids, "attention_mask": mask}
        start += ids.shape[0]


class _PoolingHooks:
    """Forward hooks that pool each requested block's output into ``self.pooled`` and stop after the last."""

    def __init__(self, stack, layers: list[int], pooling: str, final_norm: nn.Module | None):
        self.stack, self.layers, self.pooling, self.final_norm = stack, layers, pooling, final_norm
        self.mask: torch.Tensor | None = None
        self.pooled: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = []

    def __enter__(self):
        for column, index in enumerate(self.layers):
            self._handles.append(self.stack[index].register_forward_hook(self._hook(column, index)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, column: int, index: int):
        from ..kernels.pooling import masked_pool

        last_block = index == len(self.stack) - 1

        def hook(module, args, output):
            hidden = first_tensor(output)
            if hidden is None or hidden.dim() != 3:
                raise ValueError(f"block {self.stack.names[index]} returned no [batch, seq, hidden] tensor; pass "
                                 f"the block list's path explicitly (layers_path=).")
            if last_block and self.final_norm is not None:
                hidden = self.final_norm(hidden)
            mask = self.mask.to(hidden.device, non_blocking=True)
            self.pooled[column] = masked_pool(hidden, mask, self.pooling)
            if column == len(self.layers) - 1:
                raise _StopForward

        return hook


@torch.no_grad()
def layer_embeddings(model: nn.Module, data, *, pooling: str = "mean", tokenizer=None, batch_size: int = 16,
                     max_length: int = 256, layers: Sequence[int] | None = None, out: str | None = None,
                     final_norm: bool = False, progress: bool = True, layers_path: str | None = None
                     ) -> LayerEmbeddings:
    """The pooled output of each block for each example: float32 ``[N, L, H]``.

    Entry ``[n, j]`` pools, over example n's real tokens, what block ``layers[j]`` returns (for the model's
    last block, before the final norm; ``final_norm=True`` applies it there, so that entry ``i`` equals
    ``output_hidden_states=True``'s ``hidden_states[i + 1]`` pooled). Each block's output is pooled in its
    forward hook, on the device, by ``laet_fast.kernels.pooling.masked_pool``, so no full block output
    outlives its hook; the blocks above the highest requested layer, and the LM head, do not run.

    Args:
        model: a transformers model (Llama-style, GPT-2, BERT/MiniLM, GGUF-loaded...), in eval mode.
        data: a list of texts (needs ``tokenizer``; batched longest first to cut padding, returned in input
            order), or an iterable of tokenized batches (dicts with ``input_ids`` and ``attention_mask``
            [batch, seq], as ``laet_fast.loading.iter_batches`` yields; used in their order).
        pooling: ``"mean"`` over real tokens, ``"last"`` real token, or ``"first"`` real token (CLS).
        tokenizer, batch_size, max_length: how texts are tokenized (truncated to ``max_length`` tokens).
        layers: block indices to keep (default: every block); the columns follow ascending block order.
        out: a ``.npy`` path: write a memory-mapped array there and return a tensor over it (for data that
            does not fit in memory; texts only, as the example count must be known up front).
        final_norm: apply the model's final norm to the last block's output.
        progress: show a tqdm progress bar.
        layers_path: dotted path of the block list, when ``find_layers`` does not find it.

    Returns:
        a ``LayerEmbeddings`` (a float32 tensor on the CPU) carrying the texts' fingerprint, the layer
        indices and names. Position ids follow the attention mask, so left padding gives the same result.

    Raises:
        ValueError: empty data, an empty text, an unknown pooling, texts without a tokenizer, bad layers,
            ``out`` with pre-tokenized batches, or a non-finite embedding (the model produced NaN/inf).
    """
    from tqdm.auto import tqdm

    from ..kernels.pooling import POOLING_MODES

    if pooling not in POOLING_MODES:
        raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLING_MODES)}.")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be at least 1; got {batch_size} and {max_length}.")
    stack = find_layers(model, layers_path)
    chosen = _check_layers(layers, len(stack))
    norm = final_norm_of(model, stack.path) if final_norm and chosen[-1] == len(stack) - 1 else None
    is_texts = isinstance(data, (list, tuple)) and (not data or isinstance(data[0], str))
    if is_texts:
        if not data:
            raise ValueError("layer_embeddings got no texts; pass at least one.")
        count, fingerprint = len(data), fingerprint_texts(data)
        batches = _text_batches(data, tokenizer, batch_size, max_length)
    else:
        if out is not None:
            raise ValueError("out= needs a list of texts (the example count must be known up front); collect the "
                             "pre-tokenized batches' texts, or drop out=.")
        # A list of batches knows its rows up front, so the bar can show how far along the pass is (a malformed
        # batch is left to _given_batches' error).
        count = (sum(b["input_ids"].shape[0] for b in data if isinstance(b, dict) and "input_ids" in b)
                 if isinstance(data, (list, tuple)) else None)
        fingerprint = None
        batches = _given_batches(data)
    device = next(model.parameters()).device
    hidden_size = None
    store = None  # numpy memmap (out=) or a list of (indices, [B, L, H]) parts
    parts = []
    call_kwargs = {"use_cache": False} if accepts_argument(model, "use_cache") else {}
    with_positions = accepts_argument(model, "position_ids")
    bar = tqdm(total=count, unit="text", desc="layer embeddings", disable=not progress)
    try:
        with _PoolingHooks(stack, chosen, pooling, norm) as hooks:
            for indices, batch in batches:
                mask = batch["attention_mask"].to(device)
                ids = batch["input_ids"].to(device)
                hooks.mask = mask
                kwargs = dict(call_kwargs)
                if with_positions:
                    # Count positions over real tokens only, so a left-padded row sees the positions a
                    # lone, unpadded copy of it would.
                    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
                try:
                    model(input_ids=ids, attention_mask=mask, **kwargs)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the last requested block never ran; pass layers_path= to name the blocks.")
                pooled = torch.stack(hooks.pooled, dim=1).to("cpu", torch.float32)  # [B, L, H]
                if hidden_size is None:
                    hidden_size = pooled.shape[-1]
                    if out is not None:
                        store = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32,
                                                          shape=(count, len(chosen), hidden_size))
                if store is not None:
                    store[indices.numpy()] = pooled.numpy()
                else:
                    parts.append((indices, pooled))
                bar.update(len(indices))
    finally:
        bar.close()
    if store is not None:
        store.flush()
        result = torch.from_numpy(store)
    else:
        if not parts:
            raise ValueError("layer_embeddings got no batches; pass at least one example.")
        total = sum(len(i) for i, _ in parts)
        result = torch.empty(total, len(chosen), hidden_size, dtype=torch.float32)
        for indices, pooled in parts:
            result[indices] = pooled
    bad = ~torch.isfinite(result).all(dim=2)
    if bad.any():
        example, column = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"the embedding of example {example} at block {chosen[column]} is not finite (NaN/inf): "
                         f"the model overflowed (try float32) or the example has no real token.")
    return LayerEmbeddings(result, fingerprint=fingerprint, layers=chosen, names=[stack.names[i] for i in chosen],
                           pooling=pooling)

"""Classification heads on pooled block outputs, the vote between them, and the truncated forward pass.

LAET puts a head on each selected block; other methods put one on the last block. No loss depends
on a block above the highest head, so :class:`TaskModel` stops the forward pass there (a forward
hook raises once that block has run): the blocks above it and the LM head never run.

Positions are counted over real tokens (``position_ids`` from the mask, as ``layer_embeddings``
does for the probes), so a left-padded row gets the outputs an unpadded copy of it would, whatever
else shares its batch: the heads train on the features their probes were fitted on.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..embed.extract import accepts_argument
from ..embed.probes import ProbeHead
from ..layers import find_layers
from ..probe import first_tensor

POOLING = "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, H] over the real tokens (``mask`` [B, T], 1 = real); float32 [B, H]
    (``laet_fast.kernels.pooling.masked_pool``, differentiable, left or right padding)."""
    from ..kernels.pooling import masked_pool

    return masked_pool(hidden, mask, mode=POOLING)


def head_from_probe(probes, index: int) -> ProbeHead:
    """Probe ``index`` of LAET's sweep (a ``laet_fast.embed.BatchedProbe``) as a trainable head, starting
    from the probe's trained weights and standardization: raw pooled features [B, H] -> logits [B, C]."""
    return probes.head(index)


def vote(logits: torch.Tensor) -> torch.Tensor:
    """Majority vote of the heads; a tie goes to the tied class of highest mean probability.

    Args:
        logits: float [heads, B, C].

    Returns:
        int64 [B]: the predicted class of each row.
    """
    probs = logits.float().softmax(-1)
    votes = F.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0)  # [B, C]
    mean = probs.mean(0)
    tied = votes == votes.max(-1, keepdim=True).values
    return mean.masked_fill(~tied, -1.0).argmax(-1)


class _StopForward(Exception):
    """Raised by the hook on the highest head's block: nothing above it is needed."""


class TaskModel(nn.Module):
    """The transformers model with the task on top: heads for ``classify``, its own LM loss for ``lm``.

    Args:
        model: a transformers model (causal LM or base model).
        task: ``"classify"``, ``"lm"`` or ``"sft"`` (the model's own loss on the labels given).
        heads: ``classify``: block index -> head mapping pooled [B, H] features to logits [B, C].
        layers: dotted path of the block list inside ``model``.
        loss_chunk: ``lm`` / ``sft``: compute the LM head and its loss this many tokens at a time
            (``laet_fast.chunked_loss``; the logits are then not returned); 0: the model's own loss.

    The heads sit in ``self.classifier`` (an ``nn.ModuleDict`` keyed by block index), a name that
    ``apply_selection`` keeps trainable as a task head.
    """

    def __init__(self, model: nn.Module, task: str, heads: dict[int, nn.Module] | None = None,
                 layers: str | None = None, loss_chunk: int = 0):
        super().__init__()
        self.model = model
        self.task = task
        self.loss_chunk = loss_chunk
        self.stack = find_layers(model, layers)
        self.layers_path = "model." + self.stack.path
        self.classifier = nn.ModuleDict({str(i): head for i, head in sorted((heads or {}).items())})
        self._with_positions = accepts_argument(model, "position_ids")

    @property
    def head_layers(self) -> list[int]:
        return sorted(int(i) for i in self.classifier)

    @property
    def top_block(self) -> int:
        """The highest block the forward pass runs."""
        return max(self.head_layers) if self.task == "classify" else len(self.stack) - 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """Returns (loss or None, logits): ``classify``: logits float32 [heads, B, C], loss the sum of the heads'
        cross-entropies; ``lm`` / ``sft``: the model's next-token loss over ``labels`` (int64 [B, T], -100 where
        none is taken) and its logits. ``position_ids`` (int64 [B, T], packed sft rows): given to the model with
        no attention mask, so that ``transformers`` keeps attention inside each packed example."""
        kwargs = {"use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"], attention_mask = position_ids, None
        elif self._with_positions:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if self.task != "classify" and self.loss_chunk and labels is not None:
            from ..chunked_loss import lm_loss

            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return lm_loss(self.model, hidden.last_hidden_state, labels, self.loss_chunk), None
        if self.task != "classify":
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            return out.loss, out.logits
        outputs: dict[int, torch.Tensor] = {}
        top = self.top_block

        def capture(index):
            def hook(module, args, output):
                outputs[index] = first_tensor(output)
                if index == top:
                    raise _StopForward

            return hook

        handles = [self.stack[i].register_forward_hook(capture(i)) for i in self.head_layers]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        logits = torch.stack([self.classifier[str(i)](pool(outputs[i], attention_mask)) for i in self.head_layers])
        loss = None
        if labels is not None:
            loss = sum(F.cross_entropy(head_logits, labels) for head_logits in logits)
        return loss, logits

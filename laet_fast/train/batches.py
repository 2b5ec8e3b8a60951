"""Seeded batches of a ``TextData`` by position: the training stream, and evaluation in order.

The batch order is a function of the seed and a position only: the training examples form one
endless stream, epoch ``e`` being the permutation ``randperm(n, seed + e)``, and batch ``b`` is
stream items ``[b * batch_size, (b + 1) * batch_size)``. Resuming at a saved position gives the
same batches as a run that never stopped, with no data-loader state to save.

With several processes, ``batch_size`` is each rank's: a global batch is ``world * batch_size``
stream items, and rank ``r`` takes its ``r``-th slice, so the ranks together read exactly the
batch one process reads with ``batch_size * world``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data import TextData


class Batches:
    """Tokenized batches of a ``TextData``: the seeded stream for training, in order for evaluation."""

    def __init__(self, data: TextData, tokenizer, batch_size: int, max_length: int, seed: int = 0):
        if len(data) == 0:
            raise ValueError("the dataset is empty; give at least one text.")
        self.data, self.tokenizer = data, tokenizer
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.size = len(data)  # the units the stream shuffles and batches (sft's packing makes fewer)
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.size

    def truncated(self) -> int:
        """How many texts are longer than ``max_length`` tokens (and are cut to it)."""
        lengths = self.tokenizer(self.data.texts, add_special_tokens=True, truncation=False)["input_ids"]
        return sum(len(ids) > self.max_length for ids in lengths)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(self.size, generator=gen).tolist()}
        return self._orders[epoch]

    def indices_at(self, position: int, rank: int = 0, world: int = 1) -> list[int]:
        """Rank ``rank``'s slice of the global batch at ``position`` (``world * batch_size`` stream items,
        crossing epochs as needed): items ``position + rank * batch_size ..`` (``batch_size`` of them)."""
        n = self.size
        start = position + rank * self.batch_size
        return [self._order(p // n)[p % n] for p in range(start, start + self.batch_size)]

    def encode(self, indices: Sequence[int]) -> dict:
        """{input_ids, attention_mask: int64 [B, T]; labels: int64 [B] for classification}."""
        texts = [self.data.texts[i] for i in indices]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self.data.labels is not None:
            batch["labels"] = torch.tensor([self.data.labels[i] for i in indices], dtype=torch.long)
        return batch

    def at(self, position: int, rank: int = 0, world: int = 1) -> dict:
        """The encoded batch of ``indices_at(position, rank, world)``."""
        return self.encode(self.indices_at(position, rank, world))

    def in_order(self, rank: int = 0, world: int = 1):
        """Every text once, in file order (evaluation); rank ``rank`` of ``world`` takes every ``world``-th batch."""
        for start in range(rank * self.batch_size, self.size, world * self.batch_size):
            yield self.encode(range(start, min(start + self.batch_size, self.size)))

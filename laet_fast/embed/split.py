"""Seeded stratified splits of examples: one train/validation split, or k folds."""
from __future__ import annotations

import torch


def _class_orders(labels: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """For each class, its example indices in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        orders.append(members[torch.randperm(len(members), generator=generator)])
    return orders


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), each sorted; every class keeps ~``val_fraction`` of its
    examples for validation (at least one of a class with two or more, never all of one)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.2).")
    train, val = [], []
    for order in _class_orders(labels, seed):
        n = len(order)
        k = min(n - 1, max(1, round(val_fraction * n))) if n >= 2 else 0
        val.append(order[:k])
        train.append(order[k:])
    train, val = torch.cat(train).sort().values, torch.cat(val).sort().values
    if len(val) == 0:
        raise ValueError("the validation split is empty; use more examples or a larger val_fraction.")
    return train, val


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``folds`` (train, validation) index pairs; each example is validated once, classes spread evenly."""
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds={folds!r} must be an integer >= 2 (or None for one split).")
    if folds > len(labels):
        raise ValueError(f"folds={folds} is more than the {len(labels)} examples.")
    fold_of = torch.empty(len(labels), dtype=torch.long)
    offset = 0
    for order in _class_orders(labels, seed):
        # Continue the round-robin across classes so that small classes do not all land in fold 0.
        fold_of[order] = (torch.arange(len(order)) + offset) % folds
        offset += len(order)
    pairs = []
    for f in range(folds):
        val = torch.nonzero(fold_of == f).flatten()
        train = torch.nonzero(fold_of != f).flatten()
        pairs.append((train, val))
    return pairs

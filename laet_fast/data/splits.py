"""The one seeded stratified split of examples: train/held-out, or k folds.

Each class's examples are shuffled by one ``random.Random(seed)``, class after class in id order; a split holds
out the first ``round(fraction * n)`` of each class (at least one of a class with two or more, never all of it),
and folds deal each class round-robin, continuing across classes so that small classes do not all land in
fold 0. The same labels and seed give the same split on every machine and Python version.
"""
from __future__ import annotations

import random
from typing import Sequence


def _class_orders(labels: Sequence[int], seed: int) -> list[list[int]]:
    """For each class id in increasing order, its example indices in a seeded random order."""
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(int(label), []).append(index)
    rng = random.Random(seed)
    orders = []
    for label in sorted(members):
        order = members[label]
        rng.shuffle(order)
        orders.append(order)
    return orders


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept indices, held-out indices), each sorted; every class holds out about ``fraction`` of its examples.

    Args:
        labels: ``N`` class ids (a list, or a 1-D integer array / tensor). For unlabelled data, all zeros.
        fraction: the share to hold out, in (0, 1).
        seed: the shuffle's seed.

    Raises:
        ValueError: a fraction outside (0, 1), or too few examples to hold any out.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction {fraction} must be between 0 and 1 (e.g. 0.2).")
    kept, held = [], []
    for order in _class_orders(labels, seed):
        n = len(order)
        k = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        held += order[:k]
        kept += order[k:]
    if not held:
        raise ValueError(f"{len(kept)} examples are too few to hold out {fraction:.0%}; give more examples (or "
                         f"separate evaluation data).")
    return sorted(kept), sorted(held)


def stratified_folds(labels: Sequence[int], folds: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``folds`` (train indices, validation indices) pairs, each sorted; every example is validated once.

    Raises:
        ValueError: ``folds`` not an integer >= 2, or more folds than examples.
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"folds={folds!r} must be an integer >= 2 (or None for one split).")
    orders = _class_orders(labels, seed)
    total = sum(len(order) for order in orders)
    if folds > total:
        raise ValueError(f"folds={folds} is more than the {total} examples.")
    fold_of = [0] * total
    offset = 0
    for order in orders:
        for position, index in enumerate(order):
            fold_of[index] = (position + offset) % folds
        offset += len(order)
    return [([i for i in range(total) if fold_of[i] != f], [i for i in range(total) if fold_of[i] == f])
            for f in range(folds)]

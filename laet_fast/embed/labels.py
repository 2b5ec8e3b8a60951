"""Class labels as ids ``0..C-1``, from strings or integers."""
from __future__ import annotations

import numbers
from typing import Sequence

import torch


def encode_labels(labels: Sequence, num_examples: int | None = None) -> tuple[torch.Tensor, list]:
    """Map labels to ids ``0..C-1``.

    Args:
        labels: strings or integers (a list, a numpy array or an integer tensor), one per example.
        num_examples: when given, the number of examples the labels must match.

    Returns:
        ``(ids, classes)``: int64 ``[N]`` and the sorted distinct labels, so that ``classes[ids[n]]``
        is ``labels[n]``.

    Raises:
        ValueError: no labels, a count other than ``num_examples``, a single class, or labels that are
        neither all strings nor all integers (floats, None, a mix).
    """
    if isinstance(labels, torch.Tensor):
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor; got {labels.dtype} {tuple(labels.shape)}.")
        labels = labels.tolist()
    labels = list(labels)
    if not labels:
        raise ValueError("no labels given; pass one label per example.")
    if num_examples is not None and len(labels) != num_examples:
        raise ValueError(f"got {len(labels)} labels for {num_examples} examples; pass one label per example, "
                         f"in the same order.")
    if all(isinstance(v, str) for v in labels):
        values = labels
    elif all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels):
        values = [int(v) for v in labels]
    else:
        kinds = sorted({type(v).__name__ for v in labels})
        raise ValueError(f"labels must be all strings or all integers; got {', '.join(kinds)}. Map float or "
                         f"mixed labels to class names or ids first.")
    classes = sorted(set(values))
    if len(classes) < 2:
        raise ValueError(f"the labels hold a single class ({classes[0]!r}); a probe needs at least two classes.")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[v] for v in values], dtype=torch.long), classes

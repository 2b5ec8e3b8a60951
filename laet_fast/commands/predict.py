"""``laet-fast predict``: classify texts with a trained run's heads (their vote), and score them when labelled."""
from __future__ import annotations

import os
import sys

from laet_fast.commands import UsageError
from laet_fast.commands._options import add_encoding_argument, check_at_least_one, one_line, transformers_bars_off


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify texts with a model trained by `laet-fast train`",
        description="Print one predicted label per text (the heads' majority vote, ties broken by mean probability) "
                    "and, when the file has labels, the accuracy.",
    )
    parser.add_argument("--model-dir", required=True, metavar="DIR", help="the model/ folder of a train run")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help=".csv, .tsv, .json, .jsonl, .parquet or .txt (compressed too)")
    parser.add_argument("--text-column", default="text", help="column / key of the texts (default: text)")
    parser.add_argument("--label-column", default="label", help="column / key of the labels, if any (default: label)")
    add_encoding_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.set_defaults(func=run)


def run(args) -> int:
    check_at_least_one(batch_size=args.batch_size)
    if not os.path.isdir(args.model_dir):
        raise UsageError(f"--model-dir {args.model_dir} is not a folder; pass the model/ folder of a train run.")
    from laet_fast.data.examples import source_table

    try:
        table, name, _ = source_table(args.data, encoding=args.encoding)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    # stderr holds the accuracy and errors, not transformers' loading bars.
    with transformers_bars_off():
        return _predict(args, table, name)


def _predict(args, table, name: str) -> int:
    from laet_fast.data import to_text_data
    from laet_fast.data.examples import text_column_of
    from laet_fast.train.export import load_trained

    try:
        predictor = load_trained(args.model_dir, device=args.device)
        labelled = args.label_column in table.column_names
        data = to_text_data(table, "classify" if labelled else "lm", text_column_of(args.data, args.text_column),
                            args.label_column,
                            classes=predictor.classes if labelled else None, name=name)
        texts = data.texts
        labels = [predictor.classes[i] for i in data.labels] if labelled else None
        predictions = predictor.predict(texts, batch_size=args.batch_size)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    for text, label in zip(texts, predictions):
        print(f"{label}\t{text}")
    if labels is not None:
        correct = sum(p == y for p, y in zip(predictions, labels))
        print(f"accuracy {correct / len(labels):.4f} ({correct} of {len(labels)})", file=sys.stderr)
    return 0

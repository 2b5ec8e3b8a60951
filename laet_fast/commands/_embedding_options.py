"""Options and steps the ``probe`` and ``fuse`` commands share: labelled data, pooling, and embedding with one model."""
from __future__ import annotations

from laet_fast.commands import UsageError
from laet_fast.commands._options import (add_device_arguments, add_model_and_data_arguments, check_at_least_one,
                                         load_model, one_line)

# The library's choices, spelled out so that building the parser imports no torch (`laet-fast plan` on a
# built-in shape runs without it); tests/test_cli_probe.py checks they equal laet_fast.embed's own.
POOLING_CHOICES = ("mean", "last", "first")
FUSION_CHOICES = ("concat", "mean", "weighted", "gated")


def add_embedding_arguments(parser, model_help: str) -> None:
    add_model_and_data_arguments(
        parser, model_help=model_help, repeat_model=True, labels=True,
        data_help=".csv, .tsv, .json, .jsonl or .parquet with a text and a label column, compressed too, or a hub "
                  "dataset name (default: the demo Rotten Tomatoes sentences, labelled fresh/rotten)")
    parser.add_argument("--limit", type=int, default=2000, help="use at most this many examples (default: 2000)")
    parser.add_argument("--pooling", default="mean", choices=POOLING_CHOICES,
                        help="mean over real tokens (default), last real token, or first (CLS)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: 16)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (default: 64)")
    parser.add_argument("--epochs", type=int, default=20, help="probe / head training epochs (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="split, initialisation and minibatch seed (default: 0)")
    add_device_arguments(parser)


def check_embedding_arguments(args) -> None:
    check_at_least_one(limit=args.limit, batch_size=args.batch_size, max_length=args.max_length, epochs=args.epochs)


def embed(model_path: str | None, texts: list[str], args):
    """``layer_embeddings`` of every block of one model; UsageError for a model that cannot be loaded."""
    from laet_fast.embed import layer_embeddings

    model, tokenizer, _ = load_model(model_path, args, task="base")
    max_length = args.max_length
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int):
        max_length = min(max_length, positions)
    try:
        return layer_embeddings(model, texts, tokenizer=tokenizer, pooling=args.pooling, batch_size=args.batch_size,
                                max_length=max_length)
    except ValueError as err:
        raise UsageError(one_line(err)) from None

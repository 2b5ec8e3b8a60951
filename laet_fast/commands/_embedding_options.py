"""Options and steps the ``probe`` and ``fuse`` commands share: data, pooling, and embedding with one model."""
from __future__ import annotations

import os

from laet_fast.cli import UsageError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# The library's choices, spelled out so that building the parser imports no torch (`laet-fast plan` on a
# built-in shape runs without it); tests/test_cli_probe.py checks they equal laet_fast.embed's own.
POOLING_CHOICES = ("mean", "last", "first")
FUSION_CHOICES = ("concat", "mean", "weighted", "gated")


def add_embedding_arguments(parser, model_help: str) -> None:
    parser.add_argument("--model", metavar="PATH", action="append", default=None, help=model_help)
    parser.add_argument("--data", metavar="PATH", default=None,
                        help=".csv/.tsv/.jsonl with a text and a label column, optionally .bz2/.gz (default: the "
                             "demo Rotten Tomatoes sentences, labelled fresh/rotten)")
    parser.add_argument("--text-column", default="text", help="column / key holding the texts (default: text)")
    parser.add_argument("--label-column", default="label",
                        help="column / key holding the labels, strings or integers (default: label)")
    parser.add_argument("--limit", type=int, default=2000, help="use at most this many examples (default: 2000)")
    parser.add_argument("--pooling", default="mean", choices=POOLING_CHOICES,
                        help="mean over real tokens (default), last real token, or first (CLS)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: 16)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (default: 64)")
    parser.add_argument("--epochs", type=int, default=20, help="probe / head training epochs (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="split, initialisation and minibatch seed (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="model dtype (default: auto)")


def check_embedding_arguments(args) -> None:
    for option, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                          ("--max-length", args.max_length), ("--epochs", args.epochs)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}.")


def check_output(path: str | None, option: str) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: folder {folder} does not exist.")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name.")


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def embed(model_path: str | None, texts: list[str], args):
    """``layer_embeddings`` of every block of one model; UsageError for a model that cannot be loaded."""
    from laet_fast.embed import layer_embeddings
    from laet_fast.loading import load_model_and_tokenizer, resolve_device

    try:
        device = resolve_device(args.device)
        model, tokenizer = load_model_and_tokenizer(model_path, dtype=args.dtype, device=device, task="base")
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    except OSError as err:
        raise UsageError(f"cannot load the model from {model_path}: {one_line(err)}") from None
    max_length = args.max_length
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int):
        max_length = min(max_length, positions)
    try:
        return layer_embeddings(model, texts, tokenizer=tokenizer, pooling=args.pooling, batch_size=args.batch_size,
                                max_length=max_length)
    except ValueError as err:
        raise UsageError(one_line(err)) from None

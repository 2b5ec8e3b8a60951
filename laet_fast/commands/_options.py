"""Option blocks and checks the commands share: model and data, device and dtype, output files, errors.

Building a parser must import no torch (``laet-fast plan`` on a built-in shape runs without it), so the
choices are spelled out here and nothing heavy is imported at module level.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib.util
import os

from laet_fast.commands import UsageError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_model_and_data_arguments(parser, *, model_help: str, data_help: str, repeat_model: bool = False,
                                 labels: bool = False) -> None:
    """``--model``, ``--data``, ``--text-column`` and, with ``labels``, ``--label-column``.

    ``repeat_model``: ``--model`` may be given several times (a list, None when absent)."""
    parser.add_argument("--model", metavar="PATH", default=None, help=model_help,
                        **({"action": "append"} if repeat_model else {}))
    parser.add_argument("--data", metavar="PATH", default=None, help=data_help)
    parser.add_argument("--text-column", default="text", help="column / key holding the texts (default: text)")
    if labels:
        parser.add_argument("--label-column", default="label",
                            help="column / key holding the labels, strings or integers (default: label)")
    add_encoding_argument(parser)


def add_encoding_argument(parser) -> None:
    """``--encoding``: the data files' text encoding, checked when the command line is read."""
    parser.add_argument("--encoding", default="utf-8", type=_encoding,
                        help="text encoding of the data files, a Python codec name such as cp1252 or latin-1 "
                             "(default: utf-8; a byte-order mark is skipped)")


def _encoding(name: str) -> str:
    try:
        codecs.lookup(name)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {name!r}; give a Python codec name such as utf-8, "
                                         f"cp1252 or latin-1.") from None
    return name


def add_device_arguments(parser) -> None:
    """``--device`` and ``--dtype``, as ``laet_fast.loading.load_model_and_tokenizer`` takes them."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="model dtype; auto (default) = float32 on CPU, bfloat16 (float16) on GPU")


def check_at_least_one(**values: int) -> None:
    """UsageError naming the first option below 1; keywords are option names with ``_`` for ``-``
    (``check_at_least_one(batch_size=args.batch_size)`` checks ``--batch-size``)."""
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


def check_output(path: str | None, option: str) -> None:
    """UsageError unless ``path`` (when given) is a file name in an existing folder."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: folder {folder} does not exist.")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name.")


def check_plot(path: str | None, option: str = "--plot") -> None:
    """``check_output``, plus: matplotlib is installed and the suffix names a format it writes."""
    check_output(path, option)
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{option} needs matplotlib: pip install matplotlib")
    from laet_fast.scores import plot_format

    try:
        plot_format(path)
    except ValueError as err:
        raise UsageError(f"{option} {err}") from None


def one_line(err: BaseException) -> str:
    """The first line of an error's message (a library error's fix is on its first line)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextlib.contextmanager
def transformers_bars_off():
    """Silence transformers' progress bars (loading, writing shards) inside the block, so that stderr holds
    the command's own lines; the previous setting is restored on exit."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model(path: str | None, args, task: str = "causal"):
    """(model, tokenizer, device) from ``--model``/``--device``/``--dtype``; UsageError when it cannot be loaded."""
    from laet_fast.loading import load_model_and_tokenizer, resolve_device

    try:
        device = resolve_device(args.device)
        model, tokenizer = load_model_and_tokenizer(path, dtype=args.dtype, device=device, task=task)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    except OSError as err:
        raise UsageError(f"cannot load the model from {path}: {one_line(err)}") from None
    return model, tokenizer, device


def model_blocks(path: str | None) -> int | None:
    """How many blocks the model at ``--model`` ``path`` has, from its config alone (read in a moment, before
    the model is loaded, to check block numbers); None when the config names no count. UsageError when the
    config cannot be read, as ``load_model`` words it."""
    from laet_fast.layers import num_layers_of_config
    from laet_fast.loading import load_config

    try:
        return num_layers_of_config(load_config(path))
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    except OSError as err:
        raise UsageError(f"cannot load the model from {path}: {one_line(err)}") from None

"""The ``laet-fast`` command line: one sub-command per module in ``laet_fast/commands``."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func=run``.
COMMANDS = ("score", "plan", "impact", "merge")


class UsageError(Exception):
    """Bad input from the user: printed as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laet-fast",
        description="Layer-selective fine-tuning tools: score layers, choose and apply a selection, plan memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"laet_fast.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"laet-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"laet-fast {args.command}: interrupted", file=sys.stderr)
        return 130

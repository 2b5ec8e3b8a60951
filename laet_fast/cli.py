"""The ``laet-fast`` command line: one sub-command per module in ``laet_fast/commands``."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from laet_fast.commands import UsageError

# Each module of laet_fast/commands defines ``register(subparsers)``, which adds its parser and sets
# ``func=run``. They are found on disk, so adding a command is adding its module; this order is
# only how ``--help`` lists them (the workflow's order), with any other command after these.
_HELP_ORDER = ("train", "predict", "score", "probe", "fuse", "plan", "impact", "merge")


def command_names() -> list[str]:
    """The sub-commands, in ``--help`` order."""
    import laet_fast.commands

    found = [m.name for m in pkgutil.iter_modules(laet_fast.commands.__path__) if not m.name.startswith("_")]
    rank = {name: i for i, name in enumerate(_HELP_ORDER)}
    return sorted(found, key=lambda name: (rank.get(name, len(rank)), name))


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like the commands' own (no usage block before them)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from laet_fast import __version__

    parser = _Parser(
        prog="laet-fast",
        description="Layer-selective fine-tuning tools: score layers, choose and apply a selection, plan memory.",
    )
    parser.add_argument("--version", action="version", version=f"laet-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in command_names():
        importlib.import_module(f"laet_fast.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; returns the exit status (2 for bad input, 0 after --help / --version)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a command that says how to run it again
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"laet-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # A command may re-raise the interrupt with what to do next (``laet-fast train``: how to resume).
        print(f"laet-fast {args.command}: interrupted" + (f"; {interrupt}" if str(interrupt) else ""),
              file=sys.stderr)
        return 130

"""``--config FILE`` and ``--print-config``: a command's options kept in a YAML or JSON file.

A config file maps option names (``max_length`` or ``max-length``, as on the command line without the dashes) to
values. Options given on the command line override the file's; the file's override the defaults. Unknown
names are refused, naming the nearest valid one. ``--print-config`` writes the effective options in the same
form, so ``laet-fast train ... --print-config > run.yaml`` then ``laet-fast train --config run.yaml`` runs
the same thing.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os

from laet_fast.commands import UsageError

# Namespace entries that are not options of the run.
_NOT_OPTIONS = ("help", "func", "config", "print_config", "argv", "command")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read options from a YAML or JSON file (names as the options', without dashes); "
                             "options on the command line override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective options as YAML (a file --config reads) and exit")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [action.dest for action in parser._actions if action.dest not in _NOT_OPTIONS]


def read_config_file(path: str, valid: list[str], flags: tuple[str, ...] = ()) -> dict:
    """The file's options, keyed by destination name; UsageError for a bad file, an unknown name, or a flag
    (``flags``: the on/off options) whose value is not true or false."""
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file.")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise UsageError(f"--config {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f"{str(err).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of option names to values, not a "
                         f"{type(values).__name__}.")
    options = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in valid:
            near = difflib.get_close_matches(dest, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid names: {', '.join(valid)}."
            raise UsageError(f"--config {path}: unknown option {key!r}{hint}")
        if dest in flags and not isinstance(value, bool):
            raise UsageError(f"--config {path}: {key!r} is on or off: write true or false, not {value!r}.")
        options[dest] = value
    return options


def with_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> argparse.Namespace:
    """``args`` parsed again with the config file's values as defaults (the command line still wins)."""
    if args.config is None:
        return args
    flags = tuple(a.dest for a in parser._actions if isinstance(a, (argparse._StoreTrueAction,
                                                                    argparse._StoreFalseAction)))
    from_file = read_config_file(args.config, _options(parser), flags)
    own = args.argv[args.argv.index(command) + 1:] if command in args.argv else args.argv
    given = {a.dest for a in parser._actions if any(option in own or any(word.startswith(option + "=")
                                                                            for word in own)
                                                     for option in a.option_strings)}
    for group in parser._mutually_exclusive_groups:  # argparse checks these on the command line only
        members = [a.dest for a in group._group_actions]
        in_file = [dest for dest in members if from_file.get(dest) is not None]  # None: unset, as --print-config writes
        if len(in_file) > 1:
            raise UsageError(f"--config {args.config} sets {' and '.join(in_file)}; give one of them.")
        if in_file and any(dest in given for dest in members):
            del from_file[in_file[0]]  # the command line's choice of the group wins
    parser.set_defaults(**from_file)
    try:
        parsed = parser.parse_args(own)
    except SystemExit:  # argparse printed why
        raise UsageError(f"--config {args.config}: the options above were refused.") from None
    parsed.argv = args.argv
    return parsed


def effective_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    return {dest: getattr(args, dest) for dest in _options(parser)}


def config_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The effective options as YAML, in the order ``--help`` lists them."""
    import yaml

    return yaml.safe_dump(effective_options(parser, args), sort_keys=False, default_flow_style=False)

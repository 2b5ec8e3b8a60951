"""Sub-commands of the ``laet-fast`` command line (see ``laet_fast.cli``): one module each, defining
``register(subparsers)``."""


class UsageError(Exception):
    """Bad input from the user: ``laet_fast.cli`` prints it as one line, without a traceback, and exits 2."""

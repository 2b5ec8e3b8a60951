"""Sub-commands of the ``laet-fast`` command line (see ``laet_fast.cli``)."""

"""``python -m laet_fast`` runs the ``laet-fast`` command line."""
import sys

from laet_fast.cli import main

sys.exit(main())

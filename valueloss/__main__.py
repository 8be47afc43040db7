"""``python -m valueloss ...`` runs the command line (see :mod:`valueloss.batch.cli`)."""

import sys

from .batch.cli import main

if __name__ == "__main__":
    sys.exit(main())

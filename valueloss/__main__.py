"""``python -m valueloss ...`` runs the command line (see :mod:`valueloss.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

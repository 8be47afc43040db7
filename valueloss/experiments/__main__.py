"""``python -m valueloss.experiments``: see :mod:`valueloss.experiments.cli`."""

from .cli import main

if __name__ == "__main__":
    main()

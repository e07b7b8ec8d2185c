"""``python -m phi3_lightning <command> ...`` (see :mod:`phi3_lightning.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

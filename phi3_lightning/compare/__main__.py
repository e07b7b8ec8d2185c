"""``python -m phi3_lightning.compare ...`` (the same as ``python -m phi3_lightning compare-attention ...``, and run
through it: bad input is a one-line error, not a traceback)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["compare-attention", *sys.argv[1:]]))

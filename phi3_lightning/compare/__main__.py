"""``python -m phi3_lightning.compare ...`` (the same as ``python -m phi3_lightning compare-attention ...``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m phi3_lightning.compare"))

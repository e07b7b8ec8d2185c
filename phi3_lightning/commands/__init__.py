"""The package's commands beside LightningCLI's fit / validate / test / predict, and what they share.

* :mod:`.runs`: run identity for the Lightning commands (run names and versions, ``--ckpt_path last|best``
  resolved within one run, settings checked against the checkpoint, the run lock);
* :mod:`.generate`: ``python -m phi3_lightning generate``;
* :mod:`.export`: ``python -m phi3_lightning export``.

``phi3_lightning.cli`` wires LightningCLI and dispatches to these (and to ``compare-attention``, ``memory`` and
``data-report``, whose code lives beside the features they run).
"""

from __future__ import annotations


class UsageError(ValueError):
    """A problem with the command line or the files it names (printed without a traceback)."""


def command_parser(prog: str, description: str):
    from ..options import strict_jsonargparse_parser

    return strict_jsonargparse_parser(
        prog=f"python -m phi3_lightning {prog}", description=description, default_env=False
    )

"""Warnings about the data: examples cut to ``max_length``, documents split, splits not used, a resume that cannot
be exact. One category, :class:`DataWarning`; each is attributed to the line of the data module that found the
problem (not to Lightning's ``trainer/call.py``, which calls the hooks) and said once per run: by the process of
global rank 0 (the others hold the same data and would repeat it)."""

from __future__ import annotations

import os
import warnings

# where a launched process finds its rank before (or without) a process group; the first one set wins, as in
# Lightning's rank_zero_only
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class DataWarning(UserWarning):
    """A fact about the data a run trains or evaluates on (``-W ignore::phi3_lightning.data.DataWarning`` hides
    them)."""


def global_rank() -> int:
    """This process's global rank: the process group's, else the launcher's environment, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in RANK_VARIABLES:
        value = os.environ.get(var, "").strip()
        if value:
            return int(value) if value.isdigit() else 0
    return 0


def warn_data(message: str) -> None:
    """Warn ``message`` as a :class:`DataWarning` from the line that called this one, on global rank 0 only."""
    if global_rank() == 0:
        warnings.warn(message, DataWarning, stacklevel=2)

"""The training metrics' accumulated states in a checkpoint, so that a run resumed mid-epoch logs the same
``train/*_epoch`` values as the uninterrupted run.

torchmetrics keeps its states out of ``state_dict`` (they are not weights), so without this a run resumed at batch k
of an epoch would log ``train/loss_epoch`` as the mean of batches k, k+1, ... only. The states go under their own
top-level checkpoint key (:data:`TRAIN_METRICS_KEY`), never into ``state_dict``: exported weights, ``generate``,
``export`` and ``load_head`` read ``state_dict`` and the ``phi3_lightning`` entry only and never see them, and code
that does not know the key ignores it.

Several processes: each one holds the states of its own batches, and an epoch value is the states summed over the
processes (torchmetrics' sync). So at save every state is all-reduced (summed) and the checkpoint holds the sums; at
resume process 0 takes them and the other processes start from zero, which sums to the same totals. That is exact for
states whose cross-process reduction is a sum (every metric of the three heads: loss = sum / count, accuracy and F1
from true/false positive/negative counts, MSE); a metric with any other state (a concatenation, a max, a mean) is
left out under several processes, with a warning, and its epoch value after a resume covers the resumed batches only.

Where a run resumes, the states belong to the batches ``[first, next)`` of ``epoch``: they are restored only when the
resumed run's next training batch is batch ``next`` of that same epoch. A checkpoint written at an epoch's end (its
states hold the finished epoch, which Lightning does not log again on resume) therefore restores nothing into the
next epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_sum

TRAIN_METRICS_KEY = "phi3_lightning_train_metrics"
FORMAT = 1


def sum_reduced(metric: Metric) -> bool:
    """Whether every state of ``metric`` is a tensor that torchmetrics sums across processes."""
    return all(
        isinstance(getattr(metric, name), torch.Tensor) and metric._reductions.get(name) is dim_zero_sum
        for name in metric._defaults
    )


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return [v.detach().cpu().clone() for v in value]  # a list state (dist_reduce_fx="cat"), one process only


def collect(metrics: dict[str, Metric], world_size: int, all_reduce_sum) -> tuple[dict[str, Any], list[str]]:
    """``{name: {"class": ..., "updates": n, "states": {state: tensor}}}`` of the metrics whose states can be carried,
    and the names of those that cannot (several processes, a state that is not summed).

    ``all_reduce_sum(tensor)`` sums a tensor over the processes in place; it is called, in the same order on every
    process, for each state when ``world_size > 1``."""
    out: dict[str, Any] = {}
    refused: list[str] = []
    for name, metric in metrics.items():
        if world_size > 1 and not sum_reduced(metric):
            refused.append(name)
            continue
        states = {}
        for state in metric._defaults:
            value = getattr(metric, state)
            if world_size > 1:
                value = all_reduce_sum(value.detach().clone())
            states[state] = _cpu(value)
        out[name] = {"class": type(metric).__name__, "updates": int(metric._update_count), "states": states}
    return out, refused


def restore(metrics: dict[str, Metric], saved: dict[str, Any], world_size: int, rank: int) -> list[str]:
    """Put the saved states into ``metrics`` (process 0 only when ``world_size > 1``; the others keep their empty
    states). Returns the names of this run's metrics that got nothing (not saved, another metric class or other
    states, or not summed across processes while this run has several). All-or-nothing per metric."""
    skipped: list[str] = []
    for name, metric in metrics.items():
        entry = saved.get(name)
        if (
            not isinstance(entry, dict)
            or entry.get("class") != type(metric).__name__
            or set(entry.get("states") or {}) != set(metric._defaults)
            or (world_size > 1 and not sum_reduced(metric))
        ):
            skipped.append(name)
            continue
        if world_size > 1 and rank != 0:
            continue
        for state, value in entry["states"].items():
            current = getattr(metric, state)
            if isinstance(current, torch.Tensor):
                setattr(metric, state, value.to(device=current.device))  # the saved dtype: the very values
            else:
                setattr(metric, state, [v.to(device=metric.device) for v in value])
        metric._update_count = max(int(entry.get("updates") or 0), 1)
        metric._computed = None
    return skipped

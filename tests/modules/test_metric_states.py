"""The train metrics' states in a checkpoint (``modules/metric_states.py``): what is carried, summed, refused."""

from __future__ import annotations

import torch
from torchmetrics import CatMetric, MaxMetric
from torchmetrics.classification import MulticlassF1Score

from phi3_lightning.modules.base import LossMean
from phi3_lightning.modules.metric_states import collect, restore, sum_reduced


def _filled():
    loss, f1, cat, top = LossMean(), MulticlassF1Score(num_classes=3, average="macro"), CatMetric(), MaxMetric()
    loss.update(torch.tensor(2.0), 4)
    loss.update(torch.tensor(1.0), 2)
    f1.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    cat.update(torch.tensor([1.0, 2.0]))
    top.update(torch.tensor(5.0))
    return {"loss": loss, "f1": f1, "cat": cat, "max": top}


def test_one_process_carries_every_state_exactly():
    metrics = _filled()
    saved, refused = collect(metrics, 1, all_reduce_sum=None)  # never called with one process
    assert refused == [] and set(saved) == set(metrics)
    fresh = {"loss": LossMean(), "f1": MulticlassF1Score(num_classes=3, average="macro"), "cat": CatMetric()}
    fresh["max"] = MaxMetric()
    assert restore(fresh, saved, world_size=1, rank=0) == []
    for name, metric in metrics.items():
        assert torch.equal(fresh[name].compute(), metric.compute()), name
    fresh["loss"].update(torch.tensor(4.0), 2)  # accumulation goes on from the restored sums
    assert fresh["loss"].compute().item() == (8.0 + 2.0 + 8.0) / 8


def test_several_processes_sum_the_sum_states_and_refuse_the_others():
    metrics = _filled()
    assert sum_reduced(metrics["loss"]) and sum_reduced(metrics["f1"])
    assert not sum_reduced(metrics["cat"]) and not sum_reduced(metrics["max"])
    calls = []

    def twice(t):  # stands in for the all-reduce of two processes holding the same states
        calls.append(t.shape)
        return t.mul_(2)

    saved, refused = collect(metrics, 2, twice)
    assert refused == ["cat", "max"] and set(saved) == {"loss", "f1"}
    assert len(calls) == 2 + 4  # mean_value, weight; tp, fp, tn, fn
    assert saved["loss"]["states"]["weight"].item() == 12.0 and saved["loss"]["states"]["mean_value"].item() == 20.0
    assert torch.equal(saved["f1"]["states"]["tp"], 2 * metrics["f1"].tp)

    def fresh():
        return {"loss": LossMean(), "f1": MulticlassF1Score(num_classes=3, average="macro"), "max": MaxMetric()}

    rank0, rank1 = fresh(), fresh()
    assert restore(rank0, saved, world_size=2, rank=0) == ["max"]
    assert restore(rank1, saved, world_size=2, rank=1) == ["max"]
    assert rank0["loss"].weight.item() == 12.0 and torch.equal(rank0["f1"].tp, 2 * metrics["f1"].tp)
    assert rank1["loss"].weight.item() == 0.0 and int(rank1["f1"].tp.sum()) == 0  # summed with rank 0's: the totals


def test_a_metric_of_another_class_or_states_is_not_restored():
    saved, _ = collect(_filled(), 1, None)
    other = {"loss": MaxMetric(), "f1": MulticlassF1Score(num_classes=3, average="macro"), "new": LossMean()}
    assert restore(other, saved, world_size=1, rank=0) == ["loss", "new"]
    assert other["loss"]._update_count == 0 and other["f1"]._update_count == 1

"""``phi3_lightning.modules.LearningRateMonitor``: one learning-rate point per optimizer step, also under gradient
accumulation (Lightning's own writes the same point once per micro-batch)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from phi3_lightning.data.collate import PaddingCollator
from phi3_lightning.modules import CausalLMModule, LearningRateMonitor, WarmupDecayLR

from .helpers import quiet_trainer


class _Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[int, float]] = []

    def log_metrics(self, metrics, step=None) -> None:
        if "train/lr/pg1" in metrics:
            self.points.append((step, round(float(metrics["train/lr/pg1"]), 9)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def _lr_points(monitor, accumulate: int) -> list[tuple[int, float]]:
    torch.manual_seed(0)
    module = CausalLMModule(
        model="tiny",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda opt: WarmupDecayLR(opt, warmup_steps=2, decay="cosine", min_lr_ratio=0.0),
    )
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 7, 6, 4) * 3]
    logger = _Recorder()
    trainer = quiet_trainer(
        max_steps=3, accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=1, callbacks=[monitor]
    )
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=2, collate_fn=PaddingCollator(0)))
    return logger.points


@pytest.mark.parametrize("accumulate", [1, 3])
def test_one_learning_rate_point_per_optimizer_step(accumulate):
    ours = _lr_points(LearningRateMonitor(logging_interval="step"), accumulate)
    assert [s for s, _ in ours] == [0, 1, 2]
    assert [v for _, v in ours] == [0.0, 0.05, 0.1]  # warmup over 2 steps: the step's rate, before its update
    theirs = _lr_points(pl.callbacks.LearningRateMonitor(logging_interval="step"), accumulate)
    assert sorted(set(theirs)) == ours  # the same points ...
    assert len(theirs) == 3 * accumulate  # ... which Lightning's monitor writes once per micro-batch

"""WarmupDecayLR inside a real fit: the learning rate each optimizer step uses is the documented formula at that step's
index (linear warmup from ``warmup_start_ratio``, then cosine down to ``min_lr_ratio`` at ``total_steps``), with
``total_steps`` taken from the trainer (max_steps, or epochs x batches / accumulation); settings that cannot give a
sensible schedule are refused naming them."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from phi3_lightning.modules import CausalLMModule, WarmupDecayLR

from .helpers import quiet_trainer


def _expected(step: int, warmup: int, total: int, start: float = 0.0, floor: float = 0.1) -> float:
    if step < warmup:
        return start + (1 - start) * step / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class _LRs(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        lrs = {g["lr"] for g in optimizer.param_groups}
        assert len(lrs) == 1, lrs  # every group (decay and no-decay) follows the same schedule
        self.seen.append((trainer.global_step, lrs.pop()))


def _rows(n: int = 20) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(3, 200, (8,), generator=g), "labels": torch.randint(3, 200, (8,), generator=g)}
        for _ in range(n)
    ]


def _module(**schedule) -> CausalLMModule:
    return CausalLMModule(
        model="tiny",
        optimizer=functools.partial(torch.optim.AdamW, lr=1.0, weight_decay=0.1),
        lr_scheduler=functools.partial(WarmupDecayLR, **schedule),
    )


@pytest.mark.parametrize(
    ("accumulate", "limits", "total"),
    [(1, {"max_steps": 7}, 7), (2, {"max_epochs": 2}, 10), (3, {"max_epochs": 1, "limit_train_batches": 9}, 3)],
    ids=["max_steps", "epochs_accumulated", "limited_batches_accumulated"],
)
def test_the_lr_of_every_optimizer_step_is_the_formula_at_its_index(accumulate, limits, total):
    torch.manual_seed(0)
    lrs = _LRs()
    module = _module(warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
    trainer = quiet_trainer(accumulate_grad_batches=accumulate, limit_val_batches=0, callbacks=[lrs], **limits)
    trainer.fit(module, DataLoader(_rows(), batch_size=2))
    assert module.lr_schedulers().total_steps == total == trainer.global_step
    assert [s for s, _ in lrs.seen] == list(range(total))
    for step, lr in lrs.seen:
        assert math.isclose(lr, _expected(step, 2, total), rel_tol=1e-12, abs_tol=1e-15), (step, lr)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_start_ratio": -0.5}, r"warmup_start_ratio=-0.5 must be in \[0, 1\]"),
        ({"warmup_start_ratio": float("nan")}, r"warmup_start_ratio=nan must be in \[0, 1\]"),
        ({"warmup_start_ratio": 2.0}, r"warmup_start_ratio=2.0 must be in \[0, 1\]"),
        ({"warmup_steps": 50, "total_steps": 20}, r"warmup_steps=50 .*total_steps=20"),
    ],
)
def test_settings_without_a_sensible_schedule_are_refused(kwargs, match):
    """A negative start ratio gave a negative learning rate (gradient ascent) for the first warmup steps; NaN gave NaN
    weights; a warmup longer than the given total_steps never reached the peak learning rate. (A warmup longer than
    a run whose length comes from the trainer is allowed: the README's two-step smoke runs of the shipped configs.)"""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        WarmupDecayLR(opt, **kwargs)


def test_continuing_a_run_past_its_schedule_says_the_schedule_ended(tmp_path):
    """A run continued with a higher max_steps keeps the schedule of the run it continues (the scheduler state is
    resumed; the README's exact-resume guarantee needs it): its extra steps run at the floor learning rate. That is
    said when the run starts, not left to be found in the learning-rate chart."""
    torch.manual_seed(0)
    loader = DataLoader(_rows(), batch_size=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    first = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[ckpt], enable_checkpointing=True)
    first.fit(_module(warmup_steps=1, min_lr_ratio=0.1), loader)
    lrs = _LRs()
    again = quiet_trainer(max_steps=7, limit_val_batches=0, callbacks=[lrs])
    with pytest.warns(UserWarning, match=r"schedule .*ends at optimizer step 4.*steps 4 to 7 .*min_lr_ratio=0.1"):
        again.fit(_module(warmup_steps=1, min_lr_ratio=0.1), loader, ckpt_path=tmp_path / "step=4.ckpt")
    assert [s for s, _ in lrs.seen] == [4, 5, 6]
    assert all(math.isclose(lr, 0.1) for _, lr in lrs.seen), lrs.seen


def test_continuing_inside_the_warmup_or_with_a_given_total_or_a_constant_schedule_says_nothing():
    """The warning is only for steps that really fall on the floor: not while the warmup still runs (the README's
    two-step smoke run continued by one step, warmup 30), not for a total_steps the config gave, not for 'constant'."""
    import warnings

    def resumed(warmup: int, first: int, then: int, **kwargs) -> list[str]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        old = WarmupDecayLR(opt, warmup_steps=warmup, **kwargs)
        old.set_total_steps(first)
        new = WarmupDecayLR(opt, warmup_steps=warmup, **kwargs)
        new.set_total_steps(then)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            new.load_state_dict(old.state_dict())
        assert new.total_steps == (kwargs.get("total_steps") or first)  # the continued run's schedule
        return [str(w.message) for w in caught]

    assert resumed(30, 2, 3) == []
    assert resumed(1, 2, 3, total_steps=2) == []
    assert resumed(1, 2, 3, decay="constant") == []
    (message,) = resumed(5, 2, 9)
    assert "ends at optimizer step 5" in message and "steps 5 to 9" in message

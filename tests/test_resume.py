"""Exact resume: ``fit`` to step 2N equals ``fit`` to step N (checkpoint) + ``fit(ckpt_path=...)`` to 2N, bit for bit.

Every parameter is compared with ``torch.equal`` (CPU). The checkpoint is the one the uninterrupted run writes at
step N, so the two runs share everything up to it. Dropout is on, so the global torch RNG must travel too; a
validation pass runs at every epoch end (its dataloader must not draw from the global RNG either).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from phi3_lightning.data import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule
from phi3_lightning.modules import (
    CausalLMModule,
    SequenceClassificationModule,
    TokenClassificationModule,
    WarmupDecayLR,
)

from .modules.helpers import CONFIGS, run_module, scalars, tiny_unpacked_causal_args

DROPOUT = {"attention_dropout": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1}
BATCHES = 4  # limit_train_batches: one "epoch" is 4 steps


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume_cache"))


def _data(kind: str, cache: str):
    common = dict(cache_dir=cache, progress=False, max_length=32)
    if kind == "causal_packed":
        return CausalLMDataModule(max_files=4, batch_size=2, **common)
    if kind == "causal_padded":
        return CausalLMDataModule(max_files=4, batch_size=2, pack=False, **common)
    if kind == "sequence":
        return SequenceClassificationDataModule(max_per_class=6, batch_size=2, **common)
    return TokenClassificationDataModule(max_files=2, max_examples=40, batch_size=2, **common)


def _module(kind: str, dm, **kwargs):
    if kind.startswith("causal"):
        return CausalLMModule(model="tiny", config_overrides=DROPOUT, optimizer=_optimizer, **kwargs)
    cls = SequenceClassificationModule if kind == "sequence" else TokenClassificationModule
    return cls(
        model="tiny",
        num_labels=dm.num_labels,
        config_overrides={**DROPOUT, "classifier_dropout": 0.1},
        optimizer=_optimizer,
        **kwargs,
    )


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2)


def _trainer(
    root, max_steps, max_epochs, callbacks, limit_val_batches=1, logger=False, val_check_interval=1.0
) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=max_epochs,
        limit_train_batches=BATCHES,
        limit_val_batches=limit_val_batches,
        val_check_interval=val_check_interval,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=root,
    )


def _fit(kind, cache, root, max_steps, max_epochs, checkpoint, ckpt_path=None, logger=False, **module_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = _data(kind, cache)
    module = _module(kind, dm, **module_kwargs)
    trainer = _trainer(root, max_steps, max_epochs, [checkpoint], logger=logger)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, trainer


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ after resume, e.g. {differ[:3]}"


KINDS = ["causal_packed", "causal_padded", "sequence", "token"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("at", [3, 4, 6], ids=["mid_epoch0", "epoch_boundary", "mid_epoch1"])
def test_resume_from_step_checkpoint_is_exact(kind, at, cache, tmp_path):
    """Checkpoint at step `at` (every_n_train_steps), run to 2 * at; 4 steps per epoch."""
    total = 2 * at
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=at, save_top_k=-1, filename="{step}")
    full, _ = _fit(kind, cache, tmp_path, total, -1, ckpt)
    path = tmp_path / "a" / f"step={at}.ckpt"
    assert path.exists()
    again = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=at, save_top_k=-1, filename="{step}")
    resumed, trainer = _fit(kind, cache, tmp_path, total, -1, again, ckpt_path=path)
    assert trainer.global_step == total
    _assert_same(full, resumed)


def _schedule(optimizer):
    return WarmupDecayLR(optimizer, warmup_steps=3, total_steps=20)


def _last_saver(path, best: bool) -> ModelCheckpoint:
    if best:  # as the shipped configs: the best by val/loss, and last
        return ModelCheckpoint(dirpath=path, monitor="val/loss", mode="min", save_top_k=1, save_last=True)
    return ModelCheckpoint(dirpath=path, save_last=True, save_top_k=0)


@pytest.mark.parametrize("kind", ["causal_packed", "sequence"])
@pytest.mark.parametrize("stop", [2, 4, 6], ids=["mid_epoch0", "epoch_boundary", "mid_epoch1"])
@pytest.mark.parametrize("best", [False, True], ids=["last", "best_and_last"])
def test_fit_to_max_steps_then_continue_from_last_equals_the_uninterrupted_run(kind, stop, best, cache, tmp_path):
    """The everyday resume: ``fit`` to max_steps, then ``--ckpt_path last`` with a higher max_steps (validation at
    each epoch's end, every 4 steps; a warmup + cosine schedule). Lightning closes the epoch when max_steps ends fit,
    and a ``last.ckpt`` written after that (as it was, by PreemptionCheckpoint or ModelCheckpoint at train end) made
    the continued run start a new epoch: the rest of the epoch untrained, then the new epoch's first batches
    skipped. Continued to stop + 4, every tensor equals the uninterrupted run's, and the stop's val/loss best file
    is still written."""
    total = stop + 4
    full, _ = _fit(
        kind, cache, tmp_path, total, -1, ModelCheckpoint(dirpath=tmp_path / "f", save_top_k=0), lr_scheduler=_schedule
    )
    _, trainer = _fit(kind, cache, tmp_path, stop, -1, _last_saver(tmp_path / "a", best), lr_scheduler=_schedule)
    assert trainer.global_step == stop and (tmp_path / "a" / "last.ckpt").exists()
    if best and stop >= 4:  # a validation ran (at step 4): its best file is written, and recorded in last.ckpt
        best_path = trainer.checkpoint_callback.best_model_path
        assert best_path and torch.load(best_path, weights_only=True)["global_step"] == 4
        states = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["callbacks"]
        assert [s["best_model_path"] for k, s in states.items() if k.startswith("ModelCheckpoint")] == [best_path]
    resumed, trainer = _fit(
        kind,
        cache,
        tmp_path,
        total,
        -1,
        _last_saver(tmp_path / "a", best),
        ckpt_path=tmp_path / "a" / "last.ckpt",
        lr_scheduler=_schedule,
    )
    assert trainer.global_step == total
    _assert_same(full, resumed)


@pytest.mark.parametrize("val_batches", [0, 1], ids=["no_validation", "validation_at_epoch_end"])
def test_max_steps_mid_epoch_still_writes_the_top_k_checkpoint_of_a_train_epoch_end_saver(val_batches, cache, tmp_path):
    """A ModelCheckpoint that saves at the training epoch's end (no monitor, validation once per epoch or none) wrote
    its top-k file ``epoch=0-step=2.ckpt`` when max_steps closed the epoch; the max_steps ``last.ckpt`` saved at the
    batch (no validation follows it) must not take that save away."""
    pl.seed_everything(0, verbose=False)
    dm = _data("causal_packed", cache)
    module = _module("causal_packed", dm)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", save_last=True, save_top_k=1)
    trainer = _trainer(tmp_path, 2, -1, [ckpt], limit_val_batches=val_batches)
    trainer.fit(module, dm)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert ckpt.best_model_path == str(tmp_path / "a" / "epoch=0-step=2.ckpt")
    assert torch.load(ckpt.best_model_path, weights_only=True)["global_step"] == 2


def _train_epoch_saver(path) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=path,
        monitor="train/loss_epoch",
        mode="min",
        save_top_k=2,
        save_last=True,
        filename="{epoch}-{step}-{train/loss_epoch:.6f}",
        auto_insert_metric_name=False,
    )


def _top_k(ckpt: ModelCheckpoint) -> dict[str, float]:
    return {Path(k).name: float(v) for k, v in ckpt.best_k_models.items()}


@pytest.mark.parametrize(
    "stop, val_batches",
    [(2, 0), (6, 0), (6, 1)],
    ids=["mid_epoch0-no_validation", "mid_epoch1-no_validation", "mid_epoch1-validation_at_epoch_end"],
)
def test_max_steps_mid_epoch_keeps_the_train_epoch_metric_top_k_file_of_plain_lightning(
    stop, val_batches, cache, tmp_path
):
    """A ModelCheckpoint on ``train/loss_epoch`` (min, top 2) and a fit that stops at max_steps inside an epoch. Plain
    Lightning (without our max_steps save) closes the epoch and writes a top-k file for that partial epoch, scored with
    its ``train/loss_epoch``. Ours scored the file it made at the max_steps batch with the *previous* epoch's stale
    value (``1-6-5.19...ckpt`` next to ``0-4-5.19...ckpt``, best = epoch 0) and, in the first epoch, wrote none. Now:
    the same files and scores as plain Lightning, the score equal to the logged ``train/loss_epoch``, ``last.ckpt``
    records that top-k, and continuing from it still equals the uninterrupted run."""

    def run(root, plain, max_steps, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        dm = _data("causal_packed", cache)
        module = _module("causal_packed", dm)
        if plain:  # Lightning alone: none of our callbacks, no max_steps save
            module.configure_callbacks = lambda: []
            module._save_at_max_steps = lambda after_validation: None
        ckpt = _train_epoch_saver(root / "a")
        trainer = _trainer(root, max_steps, -1, [ckpt], limit_val_batches=val_batches)
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return module, trainer, ckpt

    _, plain_trainer, plain = run(tmp_path / "plain", True, stop)
    _, trainer, ours = run(tmp_path / "ours", False, stop)
    logged = float(trainer.callback_metrics["train/loss_epoch"])  # the partial epoch's value, logged at its close
    assert logged == float(plain_trainer.callback_metrics["train/loss_epoch"])
    assert _top_k(ours) == _top_k(plain)
    last_epoch = [v for k, v in _top_k(ours).items() if k.startswith(f"{stop // BATCHES}-{stop}-")]
    assert last_epoch == [logged]
    assert Path(ours.best_model_path).name == Path(plain.best_model_path).name
    assert float(ours.best_model_score) == min(_top_k(ours).values())
    files = sorted(p.name for p in (tmp_path / "ours" / "a").iterdir())
    assert files == sorted([*_top_k(ours), "last.ckpt"])
    last = torch.load(tmp_path / "ours" / "a" / "last.ckpt", weights_only=True)
    (state,) = [s for k, s in last["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert {Path(k).name: float(v) for k, v in state["best_k_models"].items()} == _top_k(ours)
    assert state["best_model_path"] == ours.best_model_path
    # last.ckpt is still the resumable state inside the epoch: continued to stop + 4 it equals the uninterrupted run
    # (the twelve cases of test_fit_to_max_steps_then_continue_... cover the rest; here the epoch after the first)
    if stop < BATCHES:
        return
    full, _, _ = run(tmp_path / "full", False, stop + 4)
    resumed, trainer, _ = run(tmp_path / "ours", False, stop + 4, ckpt_path=tmp_path / "ours" / "a" / "last.ckpt")
    assert trainer.global_step == stop + 4
    _assert_same(full.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("kind", ["causal_packed", "causal_padded"])
def test_resume_from_epoch_end_checkpoint_is_exact(kind, cache, tmp_path):
    """Epoch-based training (max_epochs=3), checkpoint written at the end of the first epoch."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    full, _ = _fit(kind, cache, tmp_path, -1, 3, ckpt)
    again = ModelCheckpoint(dirpath=tmp_path / "b", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    resumed, trainer = _fit(kind, cache, tmp_path, -1, 3, again, ckpt_path=tmp_path / "a" / "epoch=0.ckpt")
    assert trainer.global_step == 3 * BATCHES
    _assert_same(full, resumed)


def test_resumed_batches_are_the_uninterrupted_ones(cache):
    """The train loader's state after k batches makes a fresh loader serve exactly batches k, k+1, ... of the epoch."""
    dm = _data("causal_padded", cache)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    first = [next(it)["input_ids"] for _ in range(2)]
    state = loader.state_dict()
    rest = [b["input_ids"] for b in it]
    fresh = _data("causal_padded", cache)
    fresh.setup("fit")
    loader2 = fresh.train_dataloader()
    loader2.load_state_dict(state)
    loader2.sampler.set_epoch(1)
    again = [b["input_ids"] for b in loader2]
    assert len(again) == len(rest) and all(torch.equal(x, y) for x, y in zip(again, rest))
    assert len(first) + len(rest) == len(loader)
    # a position only means the same batches under the same data settings: anything else is refused, by name
    with pytest.raises(ValueError, match="seed was 0, this run's is 7"):
        _seeded = _data("causal_padded", cache)
        _seeded.seed = 7
        _seeded.setup("fit")
        _seeded.train_dataloader().load_state_dict(state)


class _Recorder(Logger):
    """Keeps every logged scalar: name -> [(step, value)]."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, list[tuple[int, float]]] = {}

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.values.setdefault(key, []).append((step, float(value)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _epoch_values(logger: _Recorder) -> dict[str, list[tuple[int, float]]]:
    return {k: v for k, v in logger.values.items() if k.startswith("train/") and k.endswith("_epoch")}


@pytest.mark.parametrize(
    "kind, at",
    [("causal_packed", 2), ("causal_packed", 4), ("causal_packed", 6), ("sequence", 2), ("token", 2)],
    ids=["causal-mid_epoch0", "causal-epoch_boundary", "causal-mid_epoch1", "sequence-mid_epoch0", "token-mid_epoch0"],
)
def test_resumed_train_epoch_metrics_equal_the_uninterrupted_ones(kind, at, cache, tmp_path):
    """train/*_epoch (loss, perplexity, accuracy, f1) of a run resumed from a step-`at` checkpoint equal those of the
    uninterrupted run at the same steps, bit for bit: the metric states of the epoch in progress travel in the
    checkpoint. A checkpoint at the epoch's last batch carries a finished epoch, which must not leak into the next."""
    total = 8  # two epochs of 4 steps: epoch values at steps 3 and 7
    full_log, resumed_log = _Recorder(), _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=at, save_top_k=-1, filename="{step}")
    _fit(kind, cache, tmp_path, total, -1, ckpt, logger=full_log)
    again = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=0)
    _fit(kind, cache, tmp_path, total, -1, again, ckpt_path=tmp_path / "a" / f"step={at}.ckpt", logger=resumed_log)
    full, resumed = _epoch_values(full_log), _epoch_values(resumed_log)
    names = {"causal_packed": {"loss", "perplexity"}, "sequence": {"loss", "accuracy", "f1"}}.get(
        kind, {"loss", "accuracy", "f1"}
    )
    assert set(full) == {f"train/{n}_epoch" for n in names}
    assert [s for s, _ in full["train/loss_epoch"]] == [3, 7]
    for key, values in resumed.items():
        assert values == [(s, v) for s, v in full[key] if s >= at], key  # the epochs that ended after the resume
    assert set(resumed) == set(full)


def test_checkpoint_without_train_metric_states_resumes_as_before_with_a_note(cache, tmp_path, monkeypatch):
    """A checkpoint written before the states were saved resumes (its epoch value covers the resumed batches only, as
    before) and says so; the new entry stays out of the weights, so load_head and validate read the file as ever."""
    from phi3_lightning.modules import load_head
    from phi3_lightning.modules.metric_states import TRAIN_METRICS_KEY

    full_log = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _fit("causal_packed", cache, tmp_path, 4, -1, ckpt, logger=full_log)
    saved = torch.load(tmp_path / "a" / "step=2.ckpt", weights_only=True)
    entry = saved[TRAIN_METRICS_KEY]
    assert (entry["epoch"], entry["first"], entry["next"], entry["world_size"]) == (0, 0, 2, 1)
    assert set(entry["metrics"]) == {"loss", "perplexity"} and entry["metrics"]["loss"]["updates"] == 2
    assert all(k.startswith("head.") for k in saved["state_dict"])  # weights only: nothing of the metrics
    assert set(load_head(tmp_path / "a" / "step=2.ckpt").head.state_dict()) == {
        k[len("head.") :] for k in saved["state_dict"]
    }
    dm = _data("causal_packed", cache)
    out = _trainer(tmp_path, -1, 1, []).validate(
        _module("causal_packed", dm), dm, ckpt_path=tmp_path / "a" / "step=2.ckpt"
    )
    assert out and out[0]["val/loss"] > 0

    del saved[TRAIN_METRICS_KEY]
    torch.save(saved, tmp_path / "old.ckpt")
    old_log = _Recorder()
    # the note, read where the module emits it: Lightning's logger may be cut off from the root logger, set to
    # WARNING, or rank_zero_only may think this is not rank zero, depending on which tests ran before in this process
    import phi3_lightning.modules.base as base_module

    notes: list[str] = []
    monkeypatch.setattr(base_module, "rank_zero_info", lambda msg, *a, **k: notes.append(str(msg)))
    _fit(
        "causal_packed",
        cache,
        tmp_path,
        4,
        -1,
        ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=0),
        ckpt_path=tmp_path / "old.ckpt",
        logger=old_log,
    )
    text = "\n".join(notes)
    assert "holds no train metric states" in text and "covers batches 2.. only" in text
    (step, value), (full_step, full_value) = (
        old_log.values["train/loss_epoch"][0],
        full_log.values["train/loss_epoch"][0],
    )
    assert step == full_step == 3 and value != full_value  # batches 2-3 only, as before the fix


OVERLAY = """\
trainer:
  max_steps: 6
  limit_train_batches: 4
  limit_val_batches: 1
  val_check_interval: 1.0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_top_k: -1
        every_n_train_steps: 3
        filename: "{step}"
"""


@pytest.mark.slow
def test_ddp_resume_mid_epoch_is_exact(tmp_path, cache):
    """Two gloo processes, padded batches (ranks see different shapes) and dropout: step 3 checkpoint + resume to 6
    equals the uninterrupted 6 steps, every tensor of the final checkpoint."""
    (tmp_path / "overlay.yaml").write_text(OVERLAY)

    def fit(*extra):
        proc = run_module(
            "fit",
            "--config",
            CONFIGS / "causal_lm.yaml",
            "--config",
            CONFIGS / "strategies" / "ddp.yaml",
            "--config",
            tmp_path / "overlay.yaml",
            "--trainer.logger.init_args.save_dir",
            tmp_path / "logs",
            *tiny_unpacked_causal_args(cache, DROPOUT),
            *extra,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]

    run = tmp_path / "logs" / "causal_lm+ddp+overlay" / "sdpa"
    fit()
    fit("--ckpt_path", run / "version_0" / "checkpoints" / "step=3.ckpt")
    a = torch.load(run / "version_0" / "checkpoints" / "step=6.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run / "version_1" / "checkpoints" / "step=6.ckpt", weights_only=True)["state_dict"]
    _assert_same(a, b)
    # train/*_epoch: epoch 0 (steps 0-3, resumed after step 2) and epoch 1 (steps 4-5) of the resumed run equal the
    # uninterrupted run's; the two processes' states were summed at save and restored on rank 0 only (restoring them on
    # both would count steps 0-2 twice). Equal up to float summation order (the per-process sums add up differently).
    full, resumed = scalars(run / "version_0"), scalars(run / "version_1")
    for key in ("train/loss_epoch", "train/perplexity_epoch"):
        assert [s for s, _ in full[key]] == [s for s, _ in resumed[key]] == [3, 5], key
        for (_, x), (_, y) in zip(full[key], resumed[key]):
            assert math.isclose(x, y, rel_tol=1e-6), (key, x, y)


class _SigtermInValidation(pl.Callback):
    """SIGTERM to this process during the first validation pass after training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and trainer.global_step == self.step and not self.sent:
            self.sent = True
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_saves_and_resumes_exactly(cache, tmp_path):
    """Preempted while validating (after the last step of epoch 0): last.ckpt holds that step, and the resumed run
    ends with the uninterrupted run's weights."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from phi3_lightning.modules.guards import PreemptionCheckpoint

    full, _ = _fit("causal_packed", cache, tmp_path, 8, -1, ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=0))
    pl.seed_everything(0, verbose=False)
    dm = _data("causal_packed", cache)
    module = _module("causal_packed", dm)
    last = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=0, save_last=True)
    trainer = _trainer(
        tmp_path, 8, -1, [last, PreemptionCheckpoint(), _SigtermInValidation(BATCHES)], limit_val_batches=2
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(module, dm)
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == BATCHES
    resumed, trainer = _fit(
        "causal_packed",
        cache,
        tmp_path,
        8,
        -1,
        ModelCheckpoint(dirpath=tmp_path / "c", save_top_k=0),
        ckpt_path=tmp_path / "b" / "last.ckpt",
    )
    assert trainer.global_step == 8
    _assert_same(full, resumed)


class _SigtermAfterBatch(pl.Callback):
    """SIGTERM to this process at the end of training batch ``batch_idx`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.epoch, self.batch_idx = epoch, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch_idx):
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def _preempt_and_resume(
    cache, tmp_path, accumulate: int, epoch: int, batch_idx: int, steps: int, signaller=None, **trainer_kwargs
) -> int:
    """Uninterrupted fit to ``steps`` vs SIGTERM after (epoch, batch_idx) (or from ``signaller``) + resume from
    last.ckpt to ``steps``: the same weights; returns the global step the preemption saved."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from phi3_lightning.modules.guards import PreemptionCheckpoint

    trainer_kwargs = {"limit_val_batches": 0, **trainer_kwargs}
    signaller = signaller or _SigtermAfterBatch(epoch, batch_idx)

    def fit(callbacks, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        dm = _data("causal_packed", cache)
        module = _module("causal_packed", dm)
        trainer = _trainer(tmp_path, steps, -1, callbacks, **trainer_kwargs)
        trainer.accumulate_grad_batches = accumulate  # (the Trainer argument; set here to reuse _trainer)
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, trainer

    full, _ = fit([ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=0)])
    last = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=0, save_last=True)
    with pytest.raises(SIGTERMException):
        fit([last, PreemptionCheckpoint(), signaller])
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["global_step"]
    resumed, trainer = fit([ModelCheckpoint(dirpath=tmp_path / "c", save_top_k=0)], tmp_path / "b" / "last.ckpt")
    assert trainer.global_step == steps
    _assert_same(full, resumed)
    return saved


def test_sigterm_inside_an_accumulation_window_resumes_exactly(cache, tmp_path):
    """accumulate_grad_batches=2 and SIGTERM after batch 0 of epoch 1, the first micro-batch of step 3: the gradients
    it accumulated live only in memory, so the stop waits for the window's last batch (a checkpoint resuming at
    batch 1 made step 3 the gradient of batch 1 alone: every tensor differed)."""
    assert _preempt_and_resume(cache, tmp_path, accumulate=2, epoch=1, batch_idx=0, steps=4) == 3


def test_sigterm_at_the_last_batch_of_an_epoch_resumes_exactly(cache, tmp_path):
    """SIGTERM after the epoch's last batch: Lightning stops after closing the epoch, before the next one resets the
    batch counters; the checkpoint must resume at batch 0 of the next epoch (it resumed at batch index 4, trained
    one batch of epoch 1 and skipped the other three)."""
    assert _preempt_and_resume(cache, tmp_path, accumulate=1, epoch=0, batch_idx=BATCHES - 1, steps=6) == BATCHES


def test_sigterm_during_a_validation_inside_an_accumulation_window_resumes_exactly(cache, tmp_path):
    """accumulate_grad_batches=2 and val_check_interval=3: the validation after batch 2 runs inside the window of
    batches 2-3 (step 2). A SIGTERM during it waits for the window's end (Lightning stopped at the end of that
    validation batch and the checkpoint of step 1 lost batch 2's accumulated gradients: every tensor differed)."""
    saved = _preempt_and_resume(
        cache,
        tmp_path,
        accumulate=2,
        epoch=0,
        batch_idx=0,
        steps=4,
        signaller=_SigtermInValidation(1),
        limit_val_batches=2,
        val_check_interval=3,
    )
    assert saved == 2

"""Exact resume: ``fit`` to step 2N equals ``fit`` to step N (checkpoint) + ``fit(ckpt_path=...)`` to 2N, bit for bit.

Every parameter is compared with ``torch.equal`` (CPU). The checkpoint is the one the uninterrupted run writes at
step N, so the two runs share everything up to it. Dropout is on, so the global torch RNG must travel too; a
validation pass runs at every epoch end (its dataloader must not draw from the global RNG either).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from phi3_lightning.data import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule
from phi3_lightning.modules import CausalLMModule, SequenceClassificationModule, TokenClassificationModule

from .modules.helpers import CONFIGS, run_module

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


def _module(kind: str, dm):
    if kind.startswith("causal"):
        return CausalLMModule(model="tiny", config_overrides=DROPOUT, optimizer=_optimizer)
    cls = SequenceClassificationModule if kind == "sequence" else TokenClassificationModule
    return cls(
        model="tiny",
        num_labels=dm.num_labels,
        config_overrides={**DROPOUT, "classifier_dropout": 0.1},
        optimizer=_optimizer,
    )


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2)


def _trainer(root, max_steps, max_epochs, callbacks, limit_val_batches=1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=max_epochs,
        limit_train_batches=BATCHES,
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=root,
    )


def _fit(kind, cache, root, max_steps, max_epochs, checkpoint, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    dm = _data(kind, cache)
    module = _module(kind, dm)
    trainer = _trainer(root, max_steps, max_epochs, [checkpoint])
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
            "--model.init_args.config_overrides",
            str(DROPOUT),
            "--data.init_args.max_length",
            "32",
            "--data.init_args.max_files",
            "4",
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.pack",
            "false",
            "--data.init_args.cache_dir",
            cache,
            "--data.init_args.progress",
            "false",
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

"""The always-on guards of fit (phi3_lightning.modules.guards): a non-finite loss / gradient / weight stops the run
before the update with an error naming the step, a non-finite checkpoint is never written, settings that cannot
produce a loss are refused, and SIGTERM / Ctrl-C save a resumable last.ckpt and exit non-zero."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from phi3_lightning.modules.guards import NonFiniteError, NonFiniteGuard, PreemptionCheckpoint

from .modules.helpers import ROOT, run_main, small_args


def _all_finite(ckpt: Path) -> bool:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.ckpt"))


# ------------------------------------------------------------------------------------------------------------------
# A toy LightningModule: the guard's contract without the CLI's start-up cost
# ------------------------------------------------------------------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    """Identity forward, inf gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class _Toy(pl.LightningModule):
    def __init__(self, nan_at: int | None = None, inf_grad_at: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.nan_at, self.inf_grad_at = nan_at, inf_grad_at

    def training_step(self, batch, batch_idx):
        x = batch[0]
        loss = self.lin(x).pow(2).mean()
        if batch_idx == self.nan_at:
            loss = loss * float("nan")
        if batch_idx == self.inf_grad_at:  # finite loss, inf gradient (what an fp16 backward overflow gives)
            loss = loss + _InfGrad.apply(self.lin.bias).sum() * 0
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.lin(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g)), batch_size=4
        )

    val_dataloader = train_dataloader


class _Snapshot(Callback):
    """The weights after every optimizer step (on_train_batch_end)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.lin.weight.detach().clone())


def _trainer(tmp_path: Path, *callbacks: Callback, **kwargs) -> pl.Trainer:
    kwargs = {
        "max_steps": 6,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(accelerator="cpu", callbacks=list(callbacks), **kwargs)


def test_nan_loss_stops_before_the_update_and_names_the_step(tmp_path):
    snap = _Snapshot()
    model = _Toy(nan_at=2)
    with pytest.raises(NonFiniteError) as err:
        _trainer(tmp_path, NonFiniteGuard(), snap).fit(model)
    msg = str(err.value)
    assert "training loss is nan at global step 2" in msg and "learning rate" in msg and "bf16" in msg
    assert len(snap.weights) == 2  # steps 0 and 1 were taken, step 2 was not
    assert torch.equal(model.lin.weight, snap.weights[-1])  # the NaN step never reached the weights
    # the same run without the guard: the NaN lands in the weights (what the guard prevents)
    unguarded = _Toy(nan_at=2)
    _trainer(tmp_path, max_steps=3).fit(unguarded)
    assert not bool(torch.isfinite(unguarded.lin.weight).all())


def test_non_finite_gradient_with_finite_loss_stops_before_clipping(tmp_path):
    model = _Toy(inf_grad_at=1)
    snap = _Snapshot()
    with pytest.raises(NonFiniteError, match=r"gradient norm is non-finite at global step 1 .*lin\.bias"):
        _trainer(tmp_path, NonFiniteGuard(), snap, gradient_clip_val=1.0).fit(model)
    assert torch.equal(model.lin.weight, snap.weights[-1]) and bool(torch.isfinite(model.lin.bias).all())


def test_non_finite_checkpoint_is_refused_and_the_old_file_kept(tmp_path):
    model = _Toy()
    trainer = _trainer(tmp_path, NonFiniteGuard(), max_steps=1)
    trainer.fit(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    with torch.no_grad():
        model.lin.weight[0, 1] = float("inf")
    with pytest.raises(
        NonFiniteError, match=r"refusing to write a checkpoint at global step 1: model tensor lin\.weight"
    ):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before


class _SignalAt(Callback):
    """Send ``signum`` to this process after ``batch`` training batches (or during the sanity check)."""

    def __init__(self, signum: int, batch: int | None) -> None:
        self.signum, self.batch = signum, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.batch is None and trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_in_process_saves_last_at_a_batch_boundary(tmp_path, capsys, signum):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    snap = _Snapshot()
    trainer = _trainer(
        tmp_path,
        NonFiniteGuard(),
        PreemptionCheckpoint(),
        _SignalAt(signum, 2),
        snap,
        ckpt,
        enable_checkpointing=True,
        max_steps=50,
    )
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a pytest-xdist worker
    with pytest.raises(SIGTERMException) as exc:
        trainer.fit(_Toy())
    assert exc.value.code == 128 + signum
    saved = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3  # stopped after the batch in flight, then saved
    assert torch.equal(saved["state_dict"]["lin.weight"], snap.weights[-1])
    err = capsys.readouterr().err
    assert f"at global step 3: saved a resumable checkpoint to {tmp_path / 'ckpts' / 'last.ckpt'}" in err
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_signal_before_the_first_step_saves_nothing(tmp_path, capsys):
    trainer = _trainer(
        tmp_path,
        PreemptionCheckpoint(),
        _SignalAt(signal.SIGTERM, None),
        ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True),
        enable_checkpointing=True,
        limit_val_batches=2,
        num_sanity_val_steps=2,
    )
    with pytest.raises(SIGTERMException) as exc:
        trainer.fit(_Toy())
    assert exc.value.code == 143
    assert "nothing was trained, so nothing was saved and nothing is lost" in capsys.readouterr().err
    assert _checkpoints(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------------
# Through the CLI
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("guard_cache")


def _args(logs: Path, cache: Path, *extra: str, steps: int = 4, val_every: int = 2) -> list[str]:
    return [
        *small_args("causal_lm", logs, cache, steps=steps, val_every=val_every),
        "--data.init_args.max_length",
        "32",
        *extra,
    ]


def test_max_length_1_is_refused(tmp_path, cache):
    rc, _, err = run_main("fit", *_args(tmp_path / "logs", cache, "--data.init_args.max_length", "1"))
    assert rc == 1 and "max_length=1" in err and "next-token target" in err
    assert _checkpoints(tmp_path) == []


@pytest.mark.slow
def test_huge_lr_stops_with_the_step_and_keeps_the_good_last_ckpt(tmp_path, cache):
    logs = tmp_path / "logs"
    rc, _, err = run_main("fit", *_args(logs, cache, steps=2, val_every=2))
    assert rc == 0, err[-2000:]
    last = logs / "causal_lm" / "sdpa" / "version_0" / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    # the same run, a learning rate that diverges (a new version: a fit into version_0 must continue it); no
    # validation (no checkpoint) before the divergence
    rc, _, err = run_main(
        "fit",
        *_args(logs, cache, "--model.init_args.optimizer.init_args.lr", "1000", steps=30, val_every=25),
    )
    assert rc == 1, err[-2000:]
    assert re.search(r"error: the (training loss|gradient norm) is \S* ?\S*.* at global step \d+", err), err[-2000:]
    assert "learning rate" in err
    assert last.read_bytes() == good
    assert _checkpoints(logs / "causal_lm" / "sdpa" / "version_1") == []  # the failing run saved nothing
    assert all(_all_finite(p) for p in _checkpoints(logs))


@pytest.mark.slow
def test_fp16_true_on_cpu_stops_instead_of_writing_nan(tmp_path, cache):
    logs = tmp_path / "logs"
    rc, _, err = run_main("fit", *_args(logs, cache, "--trainer.precision", "16-true"))
    assert rc == 1, err[-2000:]
    assert re.search(r"error: .*non-finite .*global step \d+", err) and "32-true" in err, err[-2000:]
    assert all(_all_finite(p) for p in _checkpoints(logs))


class StepMarker(Callback):
    """Writes the global step to ``path`` after every training batch, then sleeps (gives a test time to signal)."""

    def __init__(self, path: str, sleep: float = 0.25) -> None:
        self.path, self.sleep = path, sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(self.path).write_text(str(trainer.global_step))
        time.sleep(self.sleep)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_fit_saves_last_ckpt_exits_nonzero_and_resumes(tmp_path, cache, signum):
    logs, marker = tmp_path / "logs", tmp_path / "step.txt"
    overlay = tmp_path / "marker.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/loss, mode: min, save_top_k: 1, save_last: true, filename: 'best-{step}'}\n"
        f"    - class_path: tests.test_guards.StepMarker\n      init_args: {{path: '{marker}'}}\n"
    )
    args = [*_args(logs, cache, steps=16, val_every=100), "--config", str(overlay)]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3_lightning", "fit", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (marker.exists() and marker.read_text().strip() and int(marker.read_text()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    last = logs / "causal_lm+marker" / "sdpa" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"saved a resumable checkpoint to {last}" in err and "--ckpt_path" in err, err[-3000:]
    saved = torch.load(last, weights_only=True)
    assert 3 <= saved["global_step"] < 16 and _all_finite(last)
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    if signum == signal.SIGINT:  # the resume path is the same for both signals: run it once
        return
    # resume from that file: the run continues to max_steps and exits 0
    rc, _, err = run_main("fit", *args, "--ckpt_path", str(last))
    assert rc == 0, err[-3000:]
    finals = [torch.load(p, weights_only=True)["global_step"] for p in logs.rglob("last.ckpt")]
    assert max(finals) == 16, finals


# ------------------------------------------------------------------------------------------------------------------
# last.ckpt is the run's newest state: after a preemption + resume, and when max_steps is off the validation grid
# ------------------------------------------------------------------------------------------------------------------


def test_resume_after_sigterm_overwrites_last_ckpt(tmp_path, caplog):
    caplog.set_level("INFO")
    ckdir = tmp_path / "ckpts"
    first = _trainer(
        tmp_path,
        NonFiniteGuard(),
        PreemptionCheckpoint(),
        _SignalAt(signal.SIGTERM, 2),
        ModelCheckpoint(dirpath=ckdir, save_last=True),
        enable_checkpointing=True,
        max_steps=8,
    )
    with pytest.raises(SIGTERMException):
        first.fit(_Toy())
    saved = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    recorded = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert [Path(v["last_model_path"]).name for v in recorded] == ["last.ckpt"]  # the callback state says so
    assert "`weights_only` was not set" not in caplog.text  # not printed by our own save
    second = _trainer(
        tmp_path,
        NonFiniteGuard(),
        PreemptionCheckpoint(),
        ModelCheckpoint(dirpath=ckdir, save_last=True),
        enable_checkpointing=True,
        max_steps=8,
    )
    second.fit(_Toy(), ckpt_path=ckdir / "last.ckpt")
    assert sorted(p.name for p in ckdir.glob("last*")) == ["last.ckpt"]  # no last-v1.ckpt
    assert torch.load(ckdir / "last.ckpt", weights_only=True)["global_step"] == 8


def test_max_steps_off_the_validation_grid_saves_the_final_step(tmp_path):
    ckdir = tmp_path / "ckpts"
    trainer = _trainer(
        tmp_path,
        NonFiniteGuard(),
        PreemptionCheckpoint(),
        ModelCheckpoint(dirpath=ckdir, save_last=True),
        enable_checkpointing=True,
        max_steps=8,
        val_check_interval=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    model = _Toy()
    trainer.fit(model)
    saved = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 8
    assert torch.equal(saved["state_dict"]["lin.weight"], model.lin.weight)


def test_ckpt_path_last_resolves_to_the_newest_last_file(tmp_path):
    from phi3_lightning.commands.runs import _last_in

    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    torch.save({"state_dict": {}, "global_step": 100}, ckdir / "last-v1.ckpt")
    torch.save({"state_dict": {}, "global_step": 47}, ckdir / "last.ckpt")  # written later, but older weights
    os.utime(ckdir / "last-v1.ckpt", (1, 1))
    assert _last_in(ckdir) == ckdir / "last-v1.ckpt"
    torch.save({"state_dict": {}, "global_step": 120}, ckdir / "last.ckpt")
    assert _last_in(ckdir) == ckdir / "last.ckpt"


@pytest.mark.parametrize("fn", ["validate", "test", "predict"])
def test_ctrl_c_during_evaluation_does_not_speak_of_training(fn, capsys):
    """Ctrl-C during validate/test/predict: no "interrupted before training started" (there is no training)."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), is_global_zero=True, global_step=0)
    PreemptionCheckpoint().on_exception(trainer, None, KeyboardInterrupt())
    assert "training" not in capsys.readouterr().err
    PreemptionCheckpoint().on_exception(
        SimpleNamespace(**{**vars(trainer), "state": SimpleNamespace(fn="fit")}), None, KeyboardInterrupt()
    )
    assert "interrupted before training started" in capsys.readouterr().err

"""Stops and errors of a two-process DDP fit (gloo, CPU) through ``python -m phi3_lightning fit``: a SIGTERM /
Ctrl-C that reaches only one process (a cluster signalling one task, ``kill`` of one pid) or all of them stops every
process at the same step (after an accumulation window's last batch), saves one last.ckpt and resumes exactly; an
error on one process is the last error printed, without the other process's connection noise."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from .modules.helpers import CONFIGS, run_module, tiny_unpacked_causal_args

pytestmark = pytest.mark.slow

DROPOUT = {"attention_dropout": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1}
STEPS = 5  # accumulate_grad_batches=2, 6 batches per epoch: 3 steps per epoch, step 5 is in epoch 1
# val_check_interval=3: a validation after batch 3, the first micro-batch of step 2's window (batches 3-4)

OVERLAY = """\
trainer:
  max_steps: 5
  accumulate_grad_batches: 2
  limit_train_batches: 6
  limit_val_batches: 2
  val_check_interval: 3
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
"""


class SignalRank(Callback):
    """Sends ``sig`` to this process at the end of training batch number ``batch`` (1-based, counted over the run)
    when this process's rank is ``rank`` (-1: every process), or during the first validation batch after it
    (``during_validation``). Writes ``<out>/rank<N>`` = the global step when fit raised (each process)."""

    def __init__(self, rank: int, batch: int, sig: str, out: str, during_validation: bool = False) -> None:
        self.rank, self.batch, self.sig, self.out, self.during_validation = rank, batch, sig, out, during_validation
        self.seen, self.sent = 0, False

    def _send(self, trainer) -> None:
        if not self.sent and self.seen == self.batch and self.rank in (-1, trainer.global_rank):
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.sig))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if not self.during_validation:
            self._send(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.during_validation and not trainer.sanity_checking:
            self._send(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"rank{trainer.global_rank}"), "w") as f:
            f.write(str(trainer.global_step))


def _fit(root, cache, name: str, *extra: str) -> subprocess.CompletedProcess:
    return _run("fit", root, cache, name, *extra)


def _run(command: str, root, cache, name: str, *extra: str) -> subprocess.CompletedProcess:
    return run_module(
        command,
        "--config",
        CONFIGS / "causal_lm.yaml",
        "--config",
        CONFIGS / "strategies" / "ddp.yaml",
        "--config",
        root / "overlay.yaml",
        "--trainer.logger.init_args.save_dir",
        root / "logs",
        "--trainer.logger.init_args.name",
        name,
        *tiny_unpacked_causal_args(cache, DROPOUT),
        *extra,
        cwd=root,
        timeout=180,  # a hang (one process stopped, the other waiting in a collective) fails instead of blocking
    )


def _last(root, name: str, version: int = 0):
    return root / "logs" / name / f"version_{version}" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt_ddp")
    (root / "overlay.yaml").write_text(OVERLAY)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("preempt_ddp_cache"))


@pytest.fixture(scope="module")
def uninterrupted(root, cache):
    proc = _fit(root, cache, "full")
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = torch.load(_last(root, "full"), weights_only=True)
    assert saved["global_step"] == STEPS
    return saved["state_dict"]


def _signal_args(root, name: str, rank: int, batch: int, sig: str, during_validation: bool = False) -> list[str]:
    return [
        "--trainer.callbacks+=tests.test_preemption_distributed.SignalRank",
        "--trainer.callbacks.rank",
        str(rank),
        "--trainer.callbacks.batch",
        str(batch),
        "--trainer.callbacks.sig",
        sig,
        "--trainer.callbacks.out",
        str(root / f"{name}_ranks"),
        "--trainer.callbacks.during_validation",
        str(during_validation).lower(),
    ]


@pytest.mark.parametrize(
    "rank, sig, during_validation, resume",
    [
        (1, "SIGTERM", False, True),
        (0, "SIGINT", False, False),  # resumes like the SIGTERM cases (one save path): one run less
        (-1, "SIGTERM", False, False),
        (1, "SIGTERM", True, True),
    ],
    ids=["SIGTERM-rank1", "SIGINT-rank0", "SIGTERM-all", "SIGTERM-rank1-validating"],
)
def test_a_signal_to_one_process_stops_all_at_the_window_end_and_resumes_exactly(
    root, cache, uninterrupted, rank, sig, during_validation, resume
):
    """The signal comes at the end of batch 3 (1-based), the first micro-batch of step 2's window, or during the
    validation that follows it: every process stops after batch 4, at global step 2, exits 128 + signal, and one
    last.ckpt of step 2 resumes to the weights of the uninterrupted run. (Lightning 2.6 broadcast from inside its
    SIGTERM handler and stopped each process on its own flag: every one of these runs hung.)"""
    name = f"{sig}-{rank}-{during_validation}"
    proc = _fit(root, cache, name, *_signal_args(root, name, rank, 3, sig, during_validation))
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-4000:]
    steps = {p.name: int(p.read_text()) for p in (root / f"{name}_ranks").iterdir()}
    assert steps == {"rank0": 2, "rank1": 2}, steps
    last = _last(root, name)
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert f"saved a resumable checkpoint to {last}" in proc.stderr, proc.stderr[-3000:]
    if not resume:
        return
    proc = _fit(root, cache, name, "--ckpt_path", str(last))
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = torch.load(_last(root, name, 1), weights_only=True)
    assert resumed["global_step"] == STEPS
    differ = [k for k, v in uninterrupted.items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not differ, f"{len(differ)}/{len(uninterrupted)} tensors differ after resume, e.g. {differ[:3]}"


class FailOnRank(Callback):
    """Raises a ValueError (bad data, say) on process ``rank`` at training batch ``batch``."""

    def __init__(self, rank: int, batch: int = 2) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            raise ValueError(f"bad data on rank {self.rank} at batch {batch_idx}")


@pytest.mark.parametrize("rank", [1, 0])
def test_an_error_on_one_process_is_the_last_error_the_user_sees(root, cache, rank):
    """One process raises: its one-line error is what the run prints last (then a one-line note from the other
    process), exit code 1, no hang. (The other process printed ~120 lines of `[rankN]: ... Connection closed by
    peer` traceback after the real error.)"""
    proc = _fit(
        root,
        cache,
        f"fail-{rank}",
        "--trainer.callbacks+=tests.test_preemption_distributed.FailOnRank",
        "--trainer.callbacks.rank",
        str(rank),
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    err = proc.stderr
    real = f"error: bad data on rank {rank} at batch 2"
    assert err.count(real) == 1, err[-4000:]
    tail = err[err.index(real) :].splitlines()
    assert "Connection closed by peer" not in err and "Traceback" not in err, err[-4000:]
    assert len(tail) <= 3, tail  # the error, its traceback hint, the other process's note
    assert f"process rank {1 - rank} stopped because another process of this run failed" in tail[-1], tail


class NaNLossOnRank(Callback):
    """Makes the training loss of process ``rank`` NaN at training batch ``batch`` (the other process's is finite)."""

    def __init__(self, rank: int, batch: int = 2) -> None:
        self.rank, self.batch = rank, batch

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != self.rank:
            return
        step = pl_module.training_step

        def training_step(batch, batch_idx):
            loss = step(batch, batch_idx)
            return loss * float("nan") if batch_idx == self.batch else loss

        pl_module.training_step = training_step


def test_a_nan_on_one_process_is_named_by_every_process(root, cache):
    """Process 1's loss is NaN at batch 2 (step 1 with accumulate_grad_batches=2); process 0's loss is finite but
    its gradients are NaN after the average: both stop before the update, and process 0's error says that the loss
    was non-finite on process 1 (it said "gradient norm is non-finite ... the loss was 6.239")."""
    proc = _fit(
        root,
        cache,
        "nan-1",
        "--trainer.callbacks+=tests.test_preemption_distributed.NaNLossOnRank",
        "--trainer.callbacks.rank",
        "1",
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    err = proc.stderr
    # each process stops with its own account (the two may reach the terminal in either order)
    assert err.count("error: ") == 2, err[-4000:]
    assert err.count("error: the training loss is nan at global step 1 (epoch 0) on process rank 1 (of 2);") == 1
    nan_there = "error: the training loss is non-finite at global step 1 (epoch 0) on process rank 1 (of 2) (this "
    assert err.count(nan_there + "process's loss was ") == 1, err[-4000:]
    assert "gradient norm" not in err and "Traceback" not in err and "Connection closed" not in err, err[-4000:]


class SignalOutside(Callback):
    """Sends ``sig`` to this process at hook ``at`` (its first call) when this process's rank is ``rank``; pauses
    ``pause`` seconds at every evaluation batch's end (so the stop is known to every process before the batches run
    out); writes ``<out>/rank<N>`` = the evaluation batches run on this process when the command raised."""

    def __init__(self, rank: int, at: str, sig: str, out: str, pause: float = 0.0) -> None:
        self.rank, self.at, self.sig, self.out, self.pause = rank, at, sig, out, pause
        self.batches, self.sent = 0, False

    def _hit(self, trainer, hook: str) -> None:
        if hook == self.at and not self.sent and trainer.global_rank == self.rank:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.sig))

    def _batch(self, trainer, hook: str) -> None:
        self.batches += 1
        self._hit(trainer, hook)
        time.sleep(self.pause)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._hit(trainer, "sanity_check_start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._hit(trainer, "train_end")

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            self._batch(trainer, "validation_batch_end")

    def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
        self._batch(trainer, "predict_batch_end")

    def on_exception(self, trainer, pl_module, exception) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"rank{trainer.global_rank}"), "w") as f:
            f.write(f"{type(exception).__name__} {self.batches}")


@pytest.mark.parametrize(
    "command, rank, at, sig, said",
    [
        (
            "validate",
            1,
            "validation_batch_end",
            "SIGTERM",
            "SIGTERM: validate stopped on every process; an interrupted "
            "validate has nothing to save (its metrics are not logged)",
        ),
        (
            "predict",
            0,
            "predict_batch_end",
            "SIGINT",
            "SIGINT: predict stopped on every process; an interrupted "
            "predict has nothing to save (no predictions are written)",
        ),
        (
            "fit",
            1,
            "sanity_check_start",
            "SIGTERM",
            "SIGTERM before the first optimizer step: nothing was trained, so nothing was saved",
        ),
        (
            "fit",
            1,
            "train_end",
            "SIGTERM",
            "SIGTERM after training ended: the run is complete (global step 1) and its "
            "last checkpoint holds its final state",
        ),
    ],
    ids=[
        "validate-SIGTERM-rank1",
        "predict-SIGINT-rank0",
        "sanity-check-SIGTERM-rank1",
        "after-training-SIGTERM-rank1",
    ],
)
def test_a_signal_to_one_process_outside_training_stops_every_process(root, cache, command, rank, at, sig, said):
    """validate / predict (an evaluation: no per-batch collective to agree with), fit's sanity check, and the end of
    fit after its last step: a signal that reaches one process stops both, exit code 128 + signal, one clear line,
    nothing written. (Lightning 2.6 broadcast from inside its SIGTERM handler on the signalled process only: validate,
    test and the sanity check hung until killed; predict exited 0 with process 1's predictions missing; a SIGTERM
    after training was ignored, exit 0.)"""
    name = f"{command}-{at}-{sig}"
    out = root / f"{name}_ranks"
    args = [
        "--trainer.callbacks+=tests.test_preemption_distributed.SignalOutside",
        "--trainer.callbacks.rank",
        str(rank),
        "--trainer.callbacks.at",
        at,
        "--trainer.callbacks.sig",
        sig,
        "--trainer.callbacks.out",
        str(out),
        "--trainer.callbacks.pause",
        "0.3" if command != "fit" else "0",
        "--trainer.limit_val_batches",
        "6",
        "--trainer.limit_predict_batches",
        "6",
        "--trainer.max_steps",
        "1",
    ]
    if at == "sanity_check_start":
        args += ["--trainer.num_sanity_val_steps", "2"]
    proc = _fit(root, cache, name, *args) if command == "fit" else _run(command, root, cache, name, *args)
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-4000:]
    assert proc.stderr.count(said) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-4000:]
    stopped = {p.name: p.read_text().split() for p in out.iterdir()}
    assert set(stopped) == {"rank0", "rank1"} and {v[0] for v in stopped.values()} == {"SIGTERMException"}, stopped
    if command != "fit":  # the signal at batch 1; both stop at the same batch, before the 6th (not at the end)
        counts = {int(v[1]) for v in stopped.values()}
        assert len(counts) == 1 and counts.pop() < 6, stopped
        assert not list((root / "logs").glob(f"{name}/**/predictions*")), "an interrupted predict wrote predictions"
        assert not (root / "logs" / name / "version_0").exists()  # nothing of the run is kept
    elif at == "train_end":
        assert torch.load(_last(root, name), weights_only=True)["global_step"] == 1

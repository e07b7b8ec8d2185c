"""Crash, kill and interrupt cases of fit that the other run tests do not cover: a resume after the data changed
in place, a disk that fills up during a save, two fits started at once on one run name."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from phi3_lightning.data.packing import pack_documents
from phi3_lightning.data.sampling import EpochSampler, ResumableDataLoader

from .modules.helpers import CONFIGS, run_main

# ------------------------------------------------------------------------------------------------------------------
# A resume over other training rows than the checkpoint's (the same files edited in place, another tokenizer file)
# ------------------------------------------------------------------------------------------------------------------


def _loader(docs: list[list[int]]) -> ResumableDataLoader:
    rows = pack_documents(docs, 8, pad_token_id=0)
    return ResumableDataLoader(rows, batch_size=2, sampler=EpochSampler(rows, seed=0, batch_size=2))


def test_loader_state_refuses_rows_that_changed_but_not_their_number():
    docs = [[1 + (i * 7 + j) % 50 for j in range(6)] for i in range(12)]
    saved = _loader(docs)
    it = iter(saved)
    next(it)
    state = saved.state_dict()
    _loader([list(d) for d in docs]).load_state_dict(state)  # the same rows: accepted
    edited = [list(d) for d in docs]
    edited[3][2] = 99  # one token of one document: same number of rows, other content
    other = _loader(edited)
    assert len(other.dataset) == len(saved.dataset)
    with pytest.raises(ValueError, match="training rows differ from the checkpoint's"):
        other.load_state_dict(state)
    swapped = [docs[1], docs[0], *docs[2:]]  # two documents swapped: the same tokens in another order
    with pytest.raises(ValueError, match="training rows differ"):
        _loader(swapped).load_state_dict(state)


def test_rows_fingerprint_of_a_users_dataset_with_scalar_tensors_floats_and_strings():
    """A user's own map-style dataset may hold 0-dim tensors (``labels: tensor(3)``), floats and strings: each kind is
    hashed (a 0-dim tensor crashed: 'self.dim() cannot be 0 to view Long as Byte'), and a change of any value is
    seen."""
    from phi3_lightning.data.sampling import rows_fingerprint

    def items(label=3, weight=0.5, tag="a", ids=(4, 5, 6)):
        return [
            {"input_ids": torch.tensor(ids), "labels": torch.tensor(label), "weight": weight, "tag": tag},
            {"input_ids": torch.tensor([7, 8]), "labels": torch.tensor(1), "weight": 1.0, "tag": "b"},
        ]

    base = rows_fingerprint(items())
    assert rows_fingerprint(items()) == base  # deterministic
    changed = [items(label=2), items(weight=0.25), items(tag="c"), items(ids=(4, 5, 7)), items(label=3.0)]
    prints = [rows_fingerprint(c) for c in changed]
    assert base not in prints and len(set(prints)) == len(prints)


def _write_corpus(d: Path, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paras = ["\n".join("".join(rng.choice("abcdefghij ") for _ in range(40)) for _ in range(2)) for _ in range(120)]
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.txt").write_text("\n\n".join(paras))
    (d / "validation.txt").write_text("\n\n".join(paras[:10]))
    return paras


def _file_args(logs: Path, cache: Path, data: Path, steps: int) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "causal_lm.yaml"),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--data.init_args.cache_dir",
        str(cache),
        "--data.init_args.progress",
        "false",
        "--data.init_args.source",
        str(data),
        "--data.init_args.max_length",
        "32",
        "--data.init_args.batch_size",
        "4",
        "--run_name",
        "edited",
    ]


def test_fit_resume_after_the_train_file_was_edited_in_place_is_refused(tmp_path):
    # same path, same settings, same number of packed rows: only the content moved. The resumed epoch used to go on
    # at "batch k" of other rows, silently not the run it continued
    logs, cache, data = tmp_path / "logs", tmp_path / "cache", tmp_path / "data"
    paras = _write_corpus(data)
    rc, _, err = run_main("fit", *_file_args(logs, cache, data, 2))
    assert rc == 0, err[-3000:]
    last = logs / "edited" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    paras[20], paras[21] = paras[21], paras[20]  # reorder two paragraphs of train ...
    paras[30] = paras[30].replace("a", "j")  # ... and edit one: the same lengths
    (data / "train.txt").write_text("\n\n".join(paras))
    rc, _, err = run_main("fit", *_file_args(logs, cache, data, 4), "--ckpt_path", "last")
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert "training rows differ from the checkpoint's" in err, err[-3000:]
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 2


# ------------------------------------------------------------------------------------------------------------------
# A disk that fills up (or a directory that turns read-only) during a save
# ------------------------------------------------------------------------------------------------------------------


def _full_disk(monkeypatch, after: int = 0) -> list[int]:
    """torch.save fails as it does on a full disk (torch wraps the ENOSPC of the file write in a RuntimeError) from
    its ``after + 1``-th call on, having written part of the file."""
    import errno

    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] <= after:
            return real(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04" + b"\0" * 500)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1457984 vs 1457872")  # noqa: B904

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_a_full_disk_during_a_checkpoint_write_is_one_clear_error_and_the_old_file_stays(tmp_path, monkeypatch):
    from phi3_lightning.atomic import AtomicWriteError, atomic_torch_save

    target = tmp_path / "last.ckpt"
    atomic_torch_save(target, {"step": 1})
    before = target.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(AtomicWriteError) as exc:
        atomic_torch_save(target, {"step": 2})
    msg = str(exc.value)
    assert f"could not write {target}" in msg and "No space left on device" in msg and "ENOSPC" in msg, msg
    assert "unchanged" in msg and "free" in msg, msg
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no staging file left


def test_fit_stops_with_a_one_line_error_when_the_disk_fills_and_keeps_last_ckpt(tmp_path, monkeypatch):
    logs, cache, data = tmp_path / "logs", tmp_path / "cache", tmp_path / "data"
    _write_corpus(data)
    _full_disk(monkeypatch, after=2)  # step 2: best + last written; step 4: the best-step=4 write fails
    rc, _, err = run_main("fit", *_file_args(logs, cache, data, 4))
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err and "inline_container" not in err.split("error:")[-1], err[-3000:]
    ckdir = logs / "edited" / "version_0" / "checkpoints"
    assert f"error: could not write {ckdir / 'best-step=4.ckpt'}: No space left on device (ENOSPC)" in err, err[-3000:]
    assert "--ckpt_path last" in err, err[-3000:]  # how to go on once space is free
    assert torch.load(ckdir / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not [p.name for p in ckdir.iterdir() if p.name.startswith(".")]


def test_a_full_disk_during_the_preemption_save_says_so_and_still_exits_143(tmp_path, monkeypatch, capsys):
    import signal

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from phi3_lightning.modules.guards import NonFiniteGuard, PreemptionCheckpoint
    from phi3_lightning.modules.strategies import AtomicCheckpointIO

    from .test_guards import _SignalAt, _Toy, _trainer

    ckdir = tmp_path / "ckpts"
    trainer = _trainer(
        tmp_path,
        NonFiniteGuard(),
        PreemptionCheckpoint(),
        _SignalAt(signal.SIGTERM, 2),
        ModelCheckpoint(dirpath=ckdir, save_last=True),
        enable_checkpointing=True,
        max_steps=50,
        plugins=[AtomicCheckpointIO()],
    )
    _full_disk(monkeypatch)
    with pytest.raises(SIGTERMException) as exc:
        trainer.fit(_Toy())
    assert exc.value.code == 143  # still a failure a scheduler requeues
    err = capsys.readouterr().err
    assert f"SIGTERM at global step 3: could not save a checkpoint: could not write {ckdir / 'last.ckpt'}" in err, err
    assert "No space left on device" in err and "Traceback" not in err, err
    assert not ckdir.exists() or not list(ckdir.iterdir())


# ------------------------------------------------------------------------------------------------------------------
# Two fits started at once on one run name
# ------------------------------------------------------------------------------------------------------------------


def test_a_fit_whose_new_version_was_taken_meanwhile_moves_to_the_next_one(tmp_path, monkeypatch):
    # Both processes list the run's versions before either creates one: both pick version_0. The other one has just
    # created it (and is about to lock it and write its run there); this one used to write into it as well.
    from lightning.pytorch.loggers import TensorBoardLogger

    logs, cache, data = tmp_path / "logs", tmp_path / "cache", tmp_path / "data"
    _write_corpus(data)
    real = TensorBoardLogger._get_next_version
    taken = logs / "edited" / "version_0"

    def racing(self):
        version = real(self)
        if not taken.exists():
            taken.mkdir(parents=True)  # the other fit wins the race right after this one listed the versions
            (taken / "other.txt").write_text("the other run")
        return version

    monkeypatch.setattr(TensorBoardLogger, "_get_next_version", racing)
    rc, _, err = run_main("fit", *_file_args(logs, cache, data, 2))
    assert rc == 0, err[-3000:]
    assert "run edited/version_1 writes to" in err, err[-3000:]
    assert sorted(p.name for p in taken.iterdir()) == ["other.txt"]  # nothing of this run in the other's version
    assert (logs / "edited" / "version_1" / "checkpoints" / "last.ckpt").is_file()


def test_the_lock_file_is_never_seen_empty_while_its_writer_lives(tmp_path, monkeypatch):
    # fit.lock was created empty (O_EXCL) and its pid written after: a second fit reading it in between found no
    # pid, called the lock stale, took it over and both wrote into one run
    import os

    from phi3_lightning.commands.runs import RunLock

    seen = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith("fit.lock") and flags & os.O_CREAT:
            seen.append(Path(path).read_text())  # what a concurrent reader sees right after the file appears
        return fd

    monkeypatch.setattr(os, "open", spy)
    real_link = os.link

    def spy_link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        if str(dst).endswith("fit.lock"):
            seen.append(Path(dst).read_text())

    monkeypatch.setattr(os, "link", spy_link)
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        assert seen and all(s.startswith(f"{os.getpid()} ") for s in seen), seen
    finally:
        lock.release()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------------
# TensorBoard after a kill: the killed run's events past its last checkpoint
# ------------------------------------------------------------------------------------------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL inside the process: no handler of the package or of Lightning saves anything for it."""


def test_resume_after_a_kill_drops_the_killed_runs_events_past_the_checkpoint(tmp_path, monkeypatch):
    # killed while writing last.ckpt at step 4: the events of steps 2-3 were logged, the checkpoint is the one of
    # step 2; the resumed run logs steps 2-3 again, and TensorBoard drew both series (a line running back to step 2)
    import os

    from .modules.helpers import scalars

    logs, cache, data = tmp_path / "logs", tmp_path / "cache", tmp_path / "data"
    _write_corpus(data)
    real, writes = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "last.ckpt":
            writes.append(dst)
            if len(writes) == 2:
                raise _Killed
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        run_main("fit", *_file_args(logs, cache, data, 4))
    monkeypatch.setattr(os, "replace", real)
    run = logs / "edited" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    killed = scalars(run)["train/loss_step"]
    assert [s for s, _ in killed] == [0, 1, 2, 3]
    assert not (run / "fit.lock").exists()  # released by the in-process run (a real kill leaves it: stale)
    rc, _, err = run_main("fit", *_file_args(logs, cache, data, 4), "--ckpt_path", "last")
    assert rc == 0, err[-3000:]
    resumed = scalars(run)
    assert [s for s, _ in resumed["train/loss_step"]] == [0, 1, 2, 3], resumed["train/loss_step"]
    assert [s for s, _ in resumed["val/loss"]] == [1, 3], resumed["val/loss"]
    assert resumed["train/loss_step"][:2] == killed[:2]  # the steps before the checkpoint are kept


def test_a_full_disk_during_export_is_one_clear_error_and_the_previous_export_stays(tmp_path, monkeypatch, capsys):
    # safetensors reports the full disk as its own SafetensorError ("... (os error 28)"), not an OSError: export
    # printed a traceback
    import safetensors.torch

    from phi3_lightning.cli import main as cli_main

    from .test_atomic import _lightning_ckpt, _model

    ckpt, out = _lightning_ckpt(tmp_path / "a.ckpt", _model(0)), tmp_path / "exported"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    class SafetensorError(Exception):  # safetensors' own exception type, as it words a full disk
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    rc = cli_main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert f"error: could not write {out}: No space left on device (ENOSPC); the previous exported is unchanged" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "exported"]  # no staging directory left


def test_export_into_a_directory_it_may_not_write_is_one_clear_error(tmp_path, monkeypatch, capsys):
    # (as root a chmod does not stop a write, so the refusal is simulated where the staging directory is made)
    import errno

    from phi3_lightning.cli import main as cli_main

    from .test_atomic import _lightning_ckpt, _model

    ckpt, out = _lightning_ckpt(tmp_path / "a.ckpt", _model(0)), tmp_path / "ro" / "exported"
    out.parent.mkdir()
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == out.parent and self.name.startswith("."):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc = cli_main(["export", "--checkpoint", str(ckpt), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "error: cannot create the staging directory" in err and f"make {out.parent} writable" in err, err


# ------------------------------------------------------------------------------------------------------------------
# Ctrl-C before training: the exit status says "interrupted"
# ------------------------------------------------------------------------------------------------------------------


class InterruptInSetup(Callback):
    """Ctrl-C while fit sets up (data, model): the KeyboardInterrupt that Python's SIGINT handler raises."""

    def setup(self, trainer, pl_module, stage) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_before_training_exits_130_and_says_nothing_was_lost(tmp_path):
    # Lightning turns the KeyboardInterrupt into exit(1): a shell or scheduler could not tell it from an error
    logs, cache, data = tmp_path / "logs", tmp_path / "cache", tmp_path / "data"
    _write_corpus(data)
    overlay = tmp_path / "interrupt.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: tests.test_chaos.InterruptInSetup\n")
    rc, _, err = run_main("fit", *_file_args(logs, cache, data, 2), "--config", str(overlay))
    assert rc == 130, (rc, err[-3000:])
    assert "interrupted before training started: nothing was saved and nothing is lost" in err
    assert not list(logs.rglob("*.ckpt"))


class TermInSetup(Callback):
    """SIGTERM while fit sets up (data, model, checkpoint restore): before Lightning installs its own handler."""

    def setup(self, trainer, pl_module, stage) -> None:
        import os
        import signal
        import time

        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # (the handler runs before this returns)


def test_sigterm_while_fit_starts_says_nothing_was_lost_exits_143_and_leaves_no_lock(tmp_path):
    # it killed the process outright ("Terminated"): no word to the user, and fit.lock left behind
    from .modules.helpers import run_module

    logs, cache, data = tmp_path / "logs", tmp_path / "cache", tmp_path / "data"
    _write_corpus(data)
    overlay = tmp_path / "term.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: tests.test_chaos.TermInSetup\n")
    proc = run_module("fit", *_file_args(logs, cache, data, 2), "--config", overlay, cwd=tmp_path, timeout=120)
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-3000:])
    assert "SIGTERM while fit was starting" in proc.stderr and "nothing is lost" in proc.stderr, proc.stderr[-3000:]
    assert not list(logs.rglob("fit.lock")) and not list(logs.rglob("*.ckpt"))


def test_two_fits_taking_over_one_stale_lock_at_once_do_not_both_hold_it(tmp_path, monkeypatch):
    # both read the dead owner's pid; the first replaced the lock with its own; the second then overwrote that too,
    # and both continued the run in the same directory
    import socket
    import subprocess

    from phi3_lightning.atomic import atomic_write_text
    from phi3_lightning.commands import UsageError
    from phi3_lightning.commands.runs import RunLock

    from .test_atomic import _dead_pid

    run = tmp_path / "run"
    run.mkdir()
    host = socket.gethostname()
    (run / "fit.lock").write_text(f"{_dead_pid()} {host}\n")
    other = subprocess.Popen(["sleep", "60"])  # the other fit, alive
    try:
        real_owner, calls = RunLock._owner, []

        def owner(self):
            found = real_owner(self)
            if not calls:  # right after this fit read the stale owner, the other one takes the lock over
                atomic_write_text(self.path, f"{other.pid} {host}\n")
            calls.append(found)
            return found

        monkeypatch.setattr(RunLock, "_owner", owner)
        with pytest.raises(UsageError, match=f"fit process {other.pid} holds"):
            RunLock(run).acquire()
        assert (run / "fit.lock").read_text() == f"{other.pid} {host}\n"  # the other's lock stays, whole
        assert [p.name for p in run.iterdir()] == ["fit.lock"]  # nothing of the attempt left beside it
    finally:
        other.kill()
        other.wait()


def test_a_killed_checkpoint_writers_staging_file_is_removed_by_the_next_save_in_that_directory(tmp_path):
    # killed while writing best-step=8.ckpt: its hidden staging file (the size of a checkpoint) was removed only by a
    # later write of best-step=8.ckpt itself; a resumed run whose best file gets another name never wrote that one
    from phi3_lightning.atomic import staging_path
    from phi3_lightning.modules.strategies import AtomicCheckpointIO

    from .test_atomic import _dead_pid

    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    dead = _dead_pid()
    live = staging_path(ckdir / "best-step=9.ckpt")  # a live writer's (this process): kept
    live.write_bytes(b"being written")
    host = live.name.rsplit(".", 4)[2]  # .<name>.<pid>.<host>.<random>.tmp
    left = ckdir / f".best-step=8.ckpt.{dead}.{host}.0123abcd.tmp"
    left.write_bytes(b"half a checkpoint")
    old_dir = ckdir / f".sharded.ckpt.{dead}.{host}.0123abcd.tmp"  # a directory swap's half: left to its recovery
    old_dir.mkdir()
    AtomicCheckpointIO().save_checkpoint({"step": 1}, ckdir / "last.ckpt")
    assert sorted(p.name for p in ckdir.iterdir()) == sorted(["last.ckpt", live.name, old_dir.name])

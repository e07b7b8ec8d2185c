"""Run identity: --ckpt_path last/best resolve within one named run for every command, ambiguity is refused, a live
fit's lock is respected (a stale one taken over), evaluation logs into the evaluated run, settings that disagree with
the checkpoint are refused, and unreadable / mismatched checkpoints give one-line errors."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
import torch

from .modules.helpers import run_main, scalars, small_args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs: 'a' (4 steps, validated at 2 and 4) and 'b' (other data, written after 'a')."""
    root = tmp_path_factory.mktemp("runs")
    logs, cache = root / "logs", root / "cache"
    rc, _, err = run_main("fit", *small_args("causal_lm", logs, cache), "--run_name", "a")
    assert rc == 0, err[-3000:]
    rc, _, err = run_main(
        "fit", *small_args("causal_lm", logs, cache, steps=2), "--run_name", "b", "--data.init_args.max_files", "4"
    )
    assert rc == 0, err[-3000:]
    return logs, cache


def _args(runs, *extra: str) -> list[str]:
    logs, cache = runs
    return [*small_args("causal_lm", logs, cache), *extra]


def _copy_run(runs, src: str, dst: str, versions=("version_0",)) -> None:
    logs, _ = runs
    for v in versions:
        shutil.copytree(logs / src / "version_0", logs / dst / v)


def _val_loss(run_dir) -> float:
    values = scalars(run_dir)["val/loss"]
    assert len(values) == 1, values
    return values[0][1]


def test_validate_last_and_best_evaluate_the_trained_checkpoints(runs):
    logs, _ = runs
    run = logs / "a" / "version_0"
    fit_losses = [v for _, v in scalars(run)["val/loss"]]  # at steps 2 and 4

    rc, _, err = run_main("validate", *_args(runs, "--run_name", "a", "--ckpt_path", "last"))
    assert rc == 0, err[-3000:]
    assert f"{run / 'checkpoints' / 'last.ckpt'}" in err  # the note names the resolved file: run a, not the newer b
    last = _val_loss(run / "validate")
    rc, _, err = run_main(
        "validate",
        *_args(
            runs, "--ckpt_path", run / "checkpoints" / "last.ckpt", "--trainer.logger.init_args.sub_dir", "explicit"
        ),
    )
    assert rc == 0, err[-3000:]
    assert last == pytest.approx(_val_loss(run / "explicit"), abs=1e-6) == pytest.approx(fit_losses[-1], abs=1e-5)

    rc, _, err = run_main(
        "validate", *_args(runs, "--run_name", "a", "--ckpt_path", "best", "--trainer.logger.init_args.sub_dir", "best")
    )
    assert rc == 0, err[-3000:]
    assert _val_loss(run / "best") == pytest.approx(min(fit_losses), abs=1e-5)

    rc, _, err = run_main("validate", *_args(runs, "--run_name", "a", "--trainer.logger.init_args.sub_dir", "none"))
    assert rc == 0, err[-3000:]  # no checkpoint: the untrained model, which the numbers above must not be
    assert abs(_val_loss(logs / "a" / "version_1" / "none") - last) > 1e-3
    assert sorted(p.name for p in (logs / "a").iterdir()) == ["version_0", "version_1"]  # only the last one is new


def test_test_and_predict_log_into_the_evaluated_run(runs, tmp_path):
    logs, _ = runs
    run = logs / "b" / "version_0"
    config = (run / "config.yaml").read_bytes()
    rc, _, err = run_main("test", *_args(runs, "--run_name", "b", "--ckpt_path", "last"))
    assert rc == 0, err[-3000:]
    assert "test/loss" in scalars(run / "test")
    rc, _, err = run_main(
        "predict", *_args(runs, "--run_name", "b", "--ckpt_path", "best", "--predictions.path", tmp_path / "p.jsonl")
    )
    assert rc == 0, err[-3000:]
    assert (run / "predict" / "config.yaml").is_file() and (tmp_path / "p.jsonl").stat().st_size > 0
    assert [p.name for p in (logs / "b").iterdir()] == ["version_0"]  # no new version
    assert (run / "config.yaml").read_bytes() == config  # the run's record untouched


def test_fit_last_resumes_the_named_run_not_the_newest(runs):
    logs, _ = runs
    _copy_run(runs, "a", "resume_a")
    b_last = logs / "b" / "version_0" / "checkpoints" / "last.ckpt"
    b_mtime = b_last.stat().st_mtime_ns
    rc, _, err = run_main(
        "fit", *_args(runs, "--run_name", "resume_a", "--ckpt_path", "last", "--trainer.max_steps", "6")
    )
    assert rc == 0, err[-3000:]
    run = logs / "resume_a" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not (run / "fit.lock").exists() and [p.name for p in run.parent.iterdir()] == ["version_0"]
    assert b_last.stat().st_mtime_ns == b_mtime


def test_ambiguous_versions_are_refused_until_one_is_named(runs):
    logs, _ = runs
    _copy_run(runs, "a", "amb", versions=("version_0", "version_1"))
    rc, _, err = run_main("validate", *_args(runs, "--run_name", "amb", "--ckpt_path", "last"))
    assert rc == 1 and "ambiguous" in err and "version_0" in err and "version_1" in err and "--run_version" in err
    assert not (logs / "amb" / "version_2").exists()
    rc, _, err = run_main("validate", *_args(runs, "--run_name", "amb", "--ckpt_path", "last", "--run_version", "1"))
    assert rc == 0, err[-3000:]
    assert "val/loss" in scalars(logs / "amb" / "version_1" / "validate")
    rc, _, err = run_main("validate", *_args(runs, "--run_name", "nothing_here", "--ckpt_path", "best"))
    assert rc == 1 and "no checkpoints" in err and "Traceback" not in err


def test_live_lock_refuses_and_stale_lock_is_taken_over(runs):
    logs, _ = runs
    _copy_run(runs, "a", "locked")
    run = logs / "locked" / "version_0"
    config = (run / "config.yaml").read_bytes()
    live = subprocess.Popen(["sleep", "60"])
    try:
        (run / "fit.lock").write_text(f"{live.pid} {socket.gethostname()}\n")
        rc, _, err = run_main(
            "fit", *_args(runs, "--run_name", "locked", "--ckpt_path", "last", "--trainer.max_steps", "6")
        )
        assert rc == 1 and str(live.pid) in err and "fit.lock" in err
        assert (run / "config.yaml").read_bytes() == config
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    finally:
        live.kill()
        live.wait()
    (run / "fit.lock").write_text(f"{live.pid} {socket.gethostname()}\n")  # its process has ended: stale
    rc, _, err = run_main(
        "fit", *_args(runs, "--run_name", "locked", "--ckpt_path", "last", "--trainer.max_steps", "6")
    )
    assert rc == 0, err[-3000:]
    assert "stale lock" in err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not (run / "fit.lock").exists()


def test_settings_that_disagree_with_the_checkpoint(runs):
    logs, _ = runs
    ckpt = logs / "a" / "version_0" / "checkpoints" / "last.ckpt"
    rc, _, err = run_main(
        "fit", *_args(runs, "--ckpt_path", ckpt, "--model.init_args.config_overrides", "{num_hidden_layers: 3}")
    )
    assert rc == 1 and "config_overrides.num_hidden_layers" in err and "3" in err and "Traceback" not in err
    rc, _, err = run_main("fit", *_args(runs, "--ckpt_path", ckpt, "--model.init_args.optimizer.init_args.lr", "0.5"))
    assert rc == 1 and "optimizer.init_args.lr" in err and "0.5" in err and "0.003" in err
    rc, _, err = run_main("fit", *_args(runs, "--ckpt_path", ckpt, "--model.init_args.lr_scheduler", "null"))
    assert rc == 1 and "lr_scheduler" in err
    rc, _, err = run_main("validate", *_args(runs, "--ckpt_path", ckpt, "--data.init_args.tokenizer", "gpt2"))
    assert rc == 1 and "data.init_args.tokenizer" in err and "byte" in err
    # an execution setting is applied (and recorded): another attention backend, same numbers
    rc, _, err = run_main(
        "validate",
        *_args(
            runs,
            "--ckpt_path",
            ckpt,
            "--model.init_args.attn_implementation",
            "eager",
            "--trainer.logger.init_args.sub_dir",
            "eager",
        ),
    )
    assert rc == 0, err[-3000:]
    run = logs / "a" / "version_0"
    assert "attn_implementation: eager" in (run / "eager" / "config.yaml").read_text()
    assert _val_loss(run / "eager") == pytest.approx(scalars(run)["val/loss"][-1][1], abs=1e-4)
    # fused kernels are an execution setting too: taken from the command line, recorded, same numbers
    rc, _, err = run_main(
        "validate",
        *_args(
            runs,
            "--ckpt_path",
            ckpt,
            "--model.init_args.fused_kernels",
            "compile",
            "--trainer.logger.init_args.sub_dir",
            "fused",
        ),
    )
    assert rc == 0, err[-3000:]
    assert "fused_kernels: compile" in (run / "fused" / "config.yaml").read_text()
    assert _val_loss(run / "fused") == pytest.approx(scalars(run)["val/loss"][-1][1], abs=1e-4)


def test_unreadable_and_mismatched_checkpoints_are_one_line_errors(runs, tmp_path):
    logs, cache = runs
    ckpt = logs / "a" / "version_0" / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    for command in ("fit", "validate"):
        rc, _, err = run_main(command, *_args(runs, "--ckpt_path", cut))
        assert rc == 1 and "cut.ckpt" in err and "truncated or corrupt" in err and "Traceback" not in err
    rc, _, err = run_main("validate", *small_args("sequence_classification", logs, cache), "--ckpt_path", ckpt)
    assert rc == 1 and "Traceback" not in err
    assert "causal_lm" in err and "sequence_classification" in err and "configs/causal_lm.yaml" in err


def test_a_directory_that_is_no_checkpoint_is_refused_before_a_log_version_is_made(runs, tmp_path):
    # e.g. an export or a run directory given by mistake: it used to pass the checks (only FSDP2 directories are
    # checkpoints), fail inside Lightning and leave a new, useless version_N behind
    logs, _ = runs
    not_ckpt = tmp_path / "export"
    not_ckpt.mkdir()
    (not_ckpt / "config.json").write_text("{}")

    def versions():
        return sorted(p for p in logs.rglob("version_*") if p.is_dir())

    before = versions()
    for command in ("fit", "validate"):
        rc, _, err = run_main(command, *_args(runs, "--ckpt_path", not_ckpt))
        assert rc == 1 and "Traceback" not in err, err[-3000:]
        assert f"{not_ckpt} is a directory but not a distributed (FSDP2) checkpoint" in err
        assert versions() == before


@pytest.mark.parametrize(
    "setting,value,old",
    [("add_eos", "false", "True"), ("add_bos", "true", "False"), ("split_long", "false", "True")],
)
def test_fit_resume_with_data_settings_that_change_the_training_rows_is_refused(runs, setting, value, old):
    # these change every packed row but (here) not their number, so the loader's own check let them through and
    # the resumed epoch silently continued over other rows than the ones it had started
    logs, _ = runs
    ckpt = logs / "a" / "version_0" / "checkpoints" / "last.ckpt"
    before = sorted(p for p in logs.rglob("version_*") if p.is_dir())
    rc, _, err = run_main("fit", *_args(runs, "--ckpt_path", ckpt, f"--data.init_args.{setting}", value))
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert f"data.init_args.{setting} is {value.capitalize()} here but {old} in the checkpoint" in err
    assert "the same training rows" in err
    assert sorted(p for p in logs.rglob("version_*") if p.is_dir()) == before


def _data_check(tmp_path, ckpt_data: dict, cli_data: dict) -> None:
    """check_ckpt_settings for fit with only data settings in play (no CLI run: the rule itself)."""
    from jsonargparse import Namespace

    from phi3_lightning.commands.runs import check_ckpt_settings

    cfg = Namespace(data=Namespace(init_args=Namespace(**cli_data)))
    ckpt = {"hyper_parameters": {}, "datamodule_hyper_parameters": ckpt_data}
    check_ckpt_settings(cfg, ckpt, "fit", tmp_path / "last.ckpt")


def test_fit_resume_with_the_same_train_file_spelled_relative_or_absolute_is_accepted(tmp_path, monkeypatch):
    # the same file, named from the working directory or by its absolute path, gives the same rows
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    base = {"val_fraction": 0.1, "val_file": None}
    _data_check(
        tmp_path,
        {**base, "train_file": "data/train.jsonl"},
        {**base, "train_file": str(tmp_path / "data" / "train.jsonl")},
    )
    _data_check(tmp_path, {**base, "train_file": "./data/train.jsonl"}, {**base, "train_file": "data/train.jsonl"})
    # another file is still refused
    (tmp_path / "data" / "other.jsonl").write_text('{"text": "b"}\n')
    from phi3_lightning.commands import UsageError

    with pytest.raises(UsageError, match="data.init_args.train_file is 'data/other.jsonl' here but 'data/train.jsonl'"):
        _data_check(tmp_path, {**base, "train_file": "data/train.jsonl"}, {**base, "train_file": "data/other.jsonl"})


def test_fit_resume_adding_a_val_file_that_ends_the_carving_of_train_is_refused(tmp_path):
    # without val_file, val is carved out of train by val_fraction: giving one now keeps those examples in train
    # (other training rows); the loader's position would then point into other rows
    from phi3_lightning.commands import UsageError

    old = {"train_file": "t.jsonl", "val_file": None, "val_fraction": 0.1, "test_file": None, "test_fraction": 0.0}
    with pytest.raises(UsageError, match="data.init_args.val_file is 'v.jsonl' here but unset"):
        _data_check(tmp_path, old, {**old, "val_file": "v.jsonl"})
    with pytest.raises(UsageError, match="data.init_args.val_file is unset"):
        _data_check(tmp_path, {**old, "val_file": "v.jsonl"}, old)
    # free where train does not change: another val file, or a val file where nothing was carved
    _data_check(tmp_path, {**old, "val_file": "v.jsonl"}, {**old, "val_file": "w.jsonl"})
    _data_check(tmp_path, {**old, "val_fraction": 0.0}, {**old, "val_fraction": 0.0, "val_file": "v.jsonl"})
    # a test file where nothing is carved for test (test_fraction 0: test is val) changes no training row
    _data_check(tmp_path, old, {**old, "test_file": "x.jsonl"})
    # val_fraction no longer matters once val_file is given on both sides
    _data_check(tmp_path, {**old, "val_file": "v.jsonl"}, {**old, "val_file": "v.jsonl", "val_fraction": 0.2})


def test_fit_into_a_version_that_holds_a_run_is_refused_unless_it_continues_it(runs):
    """`fit --run_version 0` without `--ckpt_path last` would train a second, unrelated model into version_0: its
    events mixed with the first run's (two series over the same steps), config.yaml overwritten and last-v1.ckpt
    beside last.ckpt, where the printed `--ckpt_path last` then picks the other run's higher-step file."""
    logs, _ = runs
    _copy_run(runs, "a", "taken")
    _copy_run(runs, "a", "taken_src")
    run = logs / "taken" / "version_0"
    before = sorted(p.name for p in run.rglob("*"))
    config = (run / "config.yaml").read_bytes()
    for extra in (
        ("--run_version", "0"),
        ("--trainer.logger.init_args.version", "0"),
        ("--run_version", "0", "--ckpt_path", logs / "taken_src" / "version_0" / "checkpoints" / "last.ckpt"),
    ):
        rc, _, err = run_main("fit", *_args(runs, "--run_name", "taken", *extra))
        assert rc == 1, (extra, err[-3000:])
        assert "version_0" in err and "--ckpt_path last" in err and "Traceback" not in err, err[-3000:]
        assert sorted(p.name for p in run.rglob("*")) == before and (run / "config.yaml").read_bytes() == config
    # a new version, or continuing this one, is still fine
    rc, _, err = run_main("fit", *_args(runs, "--run_name", "taken", "--run_version", "1", "--trainer.max_steps", "2"))
    assert rc == 0, err[-3000:]
    assert (logs / "taken" / "version_1" / "checkpoints" / "last.ckpt").is_file()


def _tree(d):
    """Every path under ``d`` with its bytes (None for a directory): what a failed command must leave as it was."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def test_a_command_that_fails_before_it_ran_leaves_no_version_behind(runs):
    """A fit (or validate) that failed in setup left version_N with config.yaml, hparams.yaml and an events file of
    settings only: the next fit took version_N+1, and `fit --run_version N` was refused as "already holds a run"."""
    logs, _ = runs
    _copy_run(runs, "a", "fails")  # a trained version_0 that no failure may touch
    trained = _tree(logs / "fails")
    too_far = ("--trainer.val_check_interval", "100000")  # refused by Lightning in fit's setup
    no_data = ("--data.init_args.source", logs / "no_such_file.txt")  # refused by the data module's setup
    for command, extra in (("fit", too_far), ("fit", no_data), ("validate", no_data)):
        for name in ("fails", "fails_new"):
            rc, _, err = run_main(command, *_args(runs, "--run_name", name, *extra))
            assert rc == 1 and "Traceback" not in err, err[-3000:]
            version = "version_1" if name == "fails" else "version_0"
            assert f"removed {logs / name / version}" in err and "nothing of it is kept" in err, err[-3000:]
        assert not (logs / "fails_new").exists()  # the run's directory was new too: no trace at all
        assert _tree(logs / "fails") == trained
    # a failing continuation of the trained run, and a failing evaluation of its checkpoint, keep every file of it
    for command, extra in (("fit", (*too_far, "--trainer.max_steps", "6")), ("validate", no_data)):
        rc, _, err = run_main(command, *_args(runs, "--run_name", "fails", "--ckpt_path", "last", *extra))
        assert rc == 1 and "Traceback" not in err, err[-3000:]
        assert _tree(logs / "fails") == trained, command  # config.yaml too: it records what ran
        where = logs / "fails" / "version_0"  # (validate: version_0/validate, new unless an earlier test made it)
        assert f"restored config.yaml in {where}" in err or f"removed {where / command}" in err, err[-3000:]


def _leftover(vdir, lock_pid: int) -> None:
    """What a fit killed (kill -9, out of memory) before its first step leaves: settings, a stale lock, an events
    file with the run's settings table only."""
    from torch.utils.tensorboard import SummaryWriter

    vdir.mkdir(parents=True)
    (vdir / "config.yaml").write_text("seed_everything: 0\n")
    (vdir / "hparams.yaml").write_text("{}\n")
    (vdir / "fit.lock").write_text(f"{lock_pid} {socket.gethostname()}\n")
    (vdir / "checkpoints").mkdir()
    with SummaryWriter(str(vdir)) as w:
        w.add_text("run", "| setting | value |", global_step=0)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_leftover_of_a_killed_fit_is_never_the_run_and_blocks_nothing(runs):
    logs, _ = runs
    _copy_run(runs, "a", "killed", versions=("version_1",))
    _leftover(logs / "killed" / "version_0", _dead_pid())
    # --ckpt_path last: the version with checkpoints, not "ambiguous"
    rc, _, err = run_main("validate", *_args(runs, "--run_name", "killed", "--ckpt_path", "last"))
    assert rc == 0, err[-3000:]
    assert f"{logs / 'killed' / 'version_1' / 'checkpoints' / 'last.ckpt'}" in err
    # fit into the leftover's version: taken (the stale lock too), not refused as "already holds a run"
    rc, _, err = run_main("fit", *_args(runs, "--run_name", "killed", "--run_version", "0", "--trainer.max_steps", "2"))
    assert rc == 0, err[-3000:]
    assert "stale lock" in err
    ckpt = torch.load(logs / "killed" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2


def test_only_a_directory_of_setup_files_counts_as_a_run_that_never_ran(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from phi3_lightning.commands.runs import unstarted_run

    vdir = tmp_path / "version_0"
    _leftover(vdir, _dead_pid())
    assert unstarted_run(vdir)
    assert not unstarted_run(tmp_path / "missing")
    for what in ("scalar", "ckpt", "other file", "other text", "nested file"):
        d = tmp_path / what.replace(" ", "_")
        shutil.copytree(vdir, d)
        if what == "scalar":
            with SummaryWriter(str(d)) as w:
                w.add_scalar("train/loss", 3.0, 1)
        elif what == "ckpt":
            (d / "checkpoints" / "step=1.ckpt").write_bytes(b"x")
        elif what == "other file":
            (d / "metrics.csv").write_text("step,loss\n")
        elif what == "other text":
            with SummaryWriter(str(d)) as w:
                w.add_text("notes", "a user's note", global_step=0)
        else:
            (d / "checkpoints" / "config.yaml").write_text("{}\n")
        assert not unstarted_run(d), what


def _events_of(vdir, pid: int, host: str | None = None):
    """A settings-only events file as SummaryWriter names it (``...<host>.<pid>.<uid>``), written for process ``pid``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(vdir)) as w:
        w.add_text("run", "| setting | value |", global_step=0)
        path = w.file_writer.event_writer._file_name
    other = vdir / path.rsplit("/", 1)[-1].replace(f".{os.getpid()}.", f".{pid}.").replace(
        f".{socket.gethostname()}.", f".{host or socket.gethostname()}."
    )
    os.rename(path, other)
    return other


def test_a_failed_command_never_removes_what_another_live_command_wrote(tmp_path):
    """SetupTrace undid every new settings-only events file of the directory and every setup file of a directory it
    saw as new: a command that failed while another one was starting in the same directory (two evaluations of one
    run's checkpoint logging into version_N/validate, a validate and a fit that listed the same free version) deleted
    the live command's events file, which that command then kept writing its metrics into, unlinked: lost."""
    from phi3_lightning.commands.runs import SetupTrace

    live = subprocess.Popen(["sleep", "30"])  # the other command's process
    try:
        # a directory that existed (restore mode): the other command's new events file stays
        existing = tmp_path / "version_0" / "validate"
        existing.mkdir(parents=True)
        (existing / "config.yaml").write_text("old\n")
        trace = SetupTrace(existing)
        theirs = _events_of(existing, live.pid)
        mine = _events_of(existing, os.getpid())
        (existing / "config.yaml").write_text("new\n")
        assert trace.undo()
        assert theirs.exists() and not mine.exists()
        assert (existing / "config.yaml").read_text() == "old\n"

        # a directory this command took for new: another live command wrote into it meanwhile, it stays whole
        for what in ("events", "lock"):
            new = tmp_path / what / "version_0"
            trace = SetupTrace(new)
            new.mkdir(parents=True)
            (new / "config.yaml").write_text("theirs\n")
            if what == "events":
                _events_of(new, live.pid)
            else:
                (new / "fit.lock").write_text(f"{live.pid} {socket.gethostname()}\n")
            before = _tree(new)
            assert not trace.undo(), what
            trace.remove_empty_dirs()
            assert _tree(new) == before, what
    finally:
        live.kill()
        live.wait()


def test_a_failed_fit_with_a_sub_dir_leaves_no_empty_version_behind(runs):
    """fit claims version_N and logs into version_N/<sub_dir>: the undo removed only the sub_dir and left an empty
    version_N, so the next run took N+1."""
    logs, _ = runs
    extra = ("--trainer.val_check_interval", "100000", "--trainer.logger.init_args.sub_dir", "x")
    rc, _, err = run_main("fit", *_args(runs, "--run_name", "fails_sub", *extra))
    assert rc == 1 and "nothing of it is kept" in err, err[-3000:]
    assert not (logs / "fails_sub").exists(), sorted(p.name for p in (logs / "fails_sub").rglob("*"))
    _copy_run(runs, "a", "fails_sub2")
    rc, _, err = run_main("fit", *_args(runs, "--run_name", "fails_sub2", *extra))
    assert rc == 1 and "nothing of it is kept" in err, err[-3000:]
    assert sorted(p.name for p in (logs / "fails_sub2").iterdir()) == ["version_0"]


def test_an_undo_that_fails_keeps_the_real_error_and_releases_the_lock(runs, monkeypatch):
    """The undo runs in a finally: when it raised (a full disk while putting config.yaml back), its error replaced
    the command's own and fit.lock was never released."""
    import phi3_lightning.commands.runs as runs_module
    from phi3_lightning.atomic import AtomicWriteError

    logs, _ = runs
    _copy_run(runs, "a", "undo_fails")

    def full_disk(path, data):
        raise AtomicWriteError(28, f"could not write {path}: no space left on device")

    monkeypatch.setattr(runs_module, "atomic_write_bytes", full_disk)
    rc, _, err = run_main(
        "fit",
        *_args(runs, "--run_name", "undo_fails", "--ckpt_path", "last", "--trainer.val_check_interval", "100000"),
    )
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert "val_check_interval" in err.rsplit("error:", 1)[-1], err[-3000:]  # the command's own error is the last
    assert "no space left on device" in err  # the undo's failure is said too
    assert not (logs / "undo_fails" / "version_0" / "fit.lock").exists()

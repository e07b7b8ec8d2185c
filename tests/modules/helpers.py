"""Shared helpers of the Lightning-layer tests: run the CLI in-process, small-data overrides, TensorBoard read-back."""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
BASES = ("causal_lm", "sequence_classification", "token_classification")

# Seconds-sized runs: short rows, few stdlib files / examples, few steps.
SMALL_DATA = {
    "causal_lm": [
        "--data.init_args.max_length",
        "64",
        "--data.init_args.max_files",
        "8",
        "--data.init_args.batch_size",
        "4",
    ],
    "sequence_classification": [
        "--data.init_args.max_length",
        "64",
        "--data.init_args.max_per_class",
        "12",
        "--data.init_args.batch_size",
        "8",
    ],
    "token_classification": [
        "--data.init_args.max_length",
        "64",
        "--data.init_args.max_files",
        "5",
        "--data.init_args.max_examples",
        "96",
        "--data.init_args.batch_size",
        "8",
    ],
}


def small_args(base: str, logs: Path, cache: Path, steps: int = 4, val_every: int = 2) -> list[str]:
    return [
        "--config",
        str(CONFIGS / f"{base}.yaml"),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(val_every),
        "--trainer.limit_val_batches",
        "2",
        "--trainer.limit_test_batches",
        "2",
        "--trainer.limit_predict_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--throughput.log_every_n_steps",
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
        *SMALL_DATA[base],
    ]


def tiny_unpacked_causal_args(cache: Path, dropout: dict) -> list[str]:
    """Model and data settings of the 2-process causal-LM runs (tests/test_resume.py, test_preemption_distributed.py):
    dropout on (so the RNG state matters for an exact resume), 32-token unpacked rows, 4 files, batches of 2."""
    return [
        "--model.init_args.config_overrides",
        str(dropout),
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
    ]


def run_main(*argv: str) -> tuple[int, str, str]:
    """phi3_lightning.cli.main in this process; (exit code, stdout, stderr)."""
    from phi3_lightning.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def run_module(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m phi3_lightning ...`` in a subprocess (what a user types)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", "phi3_lightning", *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in a TensorBoard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def texts(run_dir: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    ea.Reload()
    return {
        tag: ea.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        for tag in ea.Tags()["tensors"]
        if ea.SummaryMetadata(tag).plugin_data.plugin_name == "text"
    }  # not e.g. the custom-scalars layout


def finite(values: list[tuple[int, float]]) -> bool:
    return bool(values) and all(math.isfinite(v) for _, v in values)


def built(module):
    """``module`` with its head built (``configure_model``), as Lightning does before fit."""
    module.configure_model()
    return module


def quiet_trainer(**kwargs):
    """A one-process CPU ``Trainer`` that writes and prints nothing (no logger, checkpoints, progress bar or model
    summary); ``kwargs`` add to or replace these settings."""
    import lightning.pytorch as pl

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})

"""Atomic checkpoint writes, directory swaps, run naming / resume directory selection of the CLI."""

from __future__ import annotations

import os

import pytest
import torch
from jsonargparse import Namespace

from phi3_lightning.cli import name_run
from phi3_lightning.modules import AtomicCheckpointIO
from phi3_lightning.modules.strategies import replace_dir


def test_atomic_checkpoint_io(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(2)}, path)
    assert torch.load(path, weights_only=True)["w"].sum() == 2
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"w": Boom()}, path)
    assert torch.load(path, weights_only=True)["w"].sum() == 2  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_replace_dir(tmp_path):
    new, target = tmp_path / "new", tmp_path / "target"
    new.mkdir()
    (new / "a").write_text("new")
    target.mkdir()
    (target / "old").write_text("old")
    replace_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["a"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def _cfg(config_files, attn="eager", ckpt_path=None, save_dir="logs"):
    logger = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir=save_dir, name="auto", version=None),
    )
    return Namespace(
        config=config_files,
        ckpt_path=ckpt_path,
        trainer=Namespace(logger=logger),
        model=Namespace(
            class_path="phi3_lightning.modules.CausalLMModule", init_args=Namespace(attn_implementation=attn)
        ),
    )


def test_runs_are_named_by_config_and_backend(tmp_path):
    cfg = _cfg(["configs/causal_lm.yaml", "configs/strategies/bf16.yaml"])
    name_run(cfg, "fit")
    assert cfg.trainer.logger.init_args.name == "causal_lm+bf16/eager"
    cfg = _cfg([], attn="sdpa")
    name_run(cfg, "validate")
    assert cfg.trainer.logger.init_args.name == "causal_lm/sdpa"

    # naming only: --ckpt_path last is resolved within the one named run (tests/test_runs.py), never "the newest"
    cfg = _cfg(["causal_lm.yaml"], attn="sdpa", ckpt_path="last", save_dir=str(tmp_path))
    name_run(cfg, "fit")
    assert cfg.trainer.logger.init_args.version is None
    cfg.run_name, cfg.run_version = "mine", "3"
    name_run(cfg, "validate")
    assert (cfg.trainer.logger.init_args.name, cfg.trainer.logger.init_args.version) == ("mine", "version_3")


def test_prediction_path_that_is_a_directory_is_refused_before_predicting(tmp_path):
    """Found only at the final rename before, after every batch had been predicted (IsADirectoryError)."""
    from types import SimpleNamespace

    from phi3_lightning.modules.callbacks import PredictionWriter

    trainer = SimpleNamespace(world_size=1, global_rank=0, log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=rf"predictions path {tmp_path / 'out'} is a directory; give a file"):
        PredictionWriter(str(tmp_path / "out")).on_predict_start(trainer, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging file left

"""Loading a checkpoint never runs code from it.

Every entry point that reads a Lightning checkpoint (fit / validate / test / predict ``--ckpt_path``, ``generate``,
``export``, ``load_head``, the FSDP2 strategy's resume) is given a crafted file whose unpickling would create a
marker file; each must refuse it with a clear error and leave no marker. A checkpoint written by ``fit`` loads in
all of them. Distributed (FSDP2) checkpoint directories are read with the restricted readers too.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from phi3_lightning.modules.loading import load_head
from phi3_lightning.modules.safe_load import (
    UnsafeCheckpointError,
    load_checkpoint_file,
    load_distributed,
    verify_checkpoint,
)

from .modules.helpers import ROOT, quiet_trainer, run_main, small_args


class _Payload:
    """Unpickling this calls os.system: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_ckpt(path: Path, marker: Path, base: dict | None = None) -> Path:
    """A checkpoint that looks like ours (state_dict, phi3_lightning entry...) with a payload inside."""
    ckpt = dict(base or {"state_dict": {}, "epoch": 0, "global_step": 0})
    ckpt["hyper_parameters"] = {**ckpt.get("hyper_parameters", {}), "payload": _Payload(marker)}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short causal-LM fit: (run dir, last.ckpt, a crafted copy of it, marker path, work dir)."""
    root = tmp_path_factory.mktemp("sec")
    logs, cache = root / "logs", root / "cache"
    rc, _, err = run_main("fit", *small_args("causal_lm", logs, cache))
    assert rc == 0, err[-3000:]
    run = logs / "causal_lm" / "sdpa" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    marker = root / "PWNED"
    evil = _evil_ckpt(root / "evil.ckpt", marker, torch.load(last, weights_only=True))
    return run, last, evil, marker, root


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """The crafted file is a real attack: an unrestricted unpickler creates the marker (so the tests below can fail)."""
    marker = tmp_path / "ran"
    evil = _evil_ckpt(tmp_path / "evil.ckpt", marker)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_no_unsafe_unpickling_anywhere_in_the_package():
    import re

    pattern = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|trust_remote_code\s*=\s*True")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "phi3_lightning").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


LIGHTNING = ("fit", "validate", "test", "predict")


@pytest.mark.parametrize("command", LIGHTNING)
def test_lightning_commands_refuse_a_crafted_ckpt(fitted, command):
    _, _, evil, marker, root = fitted
    args = small_args("causal_lm", root / "logs_evil", root / "cache")
    rc, _, err = run_main(command, *args, "--ckpt_path", evil)
    assert rc == 1
    assert "was not loaded" in err and "weights_only=True" in err and "posix.system" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_generate_and_export_refuse_a_crafted_ckpt(fitted):
    _, _, evil, marker, root = fitted
    rc, _, err = run_main("generate", "--checkpoint", evil, "--prompt", "def ", "--max_new_tokens", "2")
    assert rc == 1 and "was not loaded" in err and not marker.exists()
    rc, _, err = run_main("export", "--checkpoint", evil, "--output", root / "evil_export")
    assert rc == 1 and "was not loaded" in err and not marker.exists()
    assert not (root / "evil_export").exists()


def test_load_head_refuses_a_crafted_ckpt(fitted):
    _, _, evil, marker, _ = fitted
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_head(evil)
    assert not marker.exists()


def test_a_fit_checkpoint_loads_in_every_entry_point(fitted):
    run, last, _, _, root = fitted
    args = small_args("causal_lm", root / "logs", root / "cache")
    for command in ("validate", "test", "predict"):
        rc, _, err = run_main(command, *args, "--ckpt_path", last)
        assert rc == 0, (command, err[-2000:])
    rc, _, err = run_main("fit", *args, "--trainer.max_steps", "6", "--ckpt_path", last)
    assert rc == 0, err[-2000:]
    rc, out, err = run_main("generate", "--checkpoint", last, "--prompt", "def ", "--max_new_tokens", "3")
    assert rc == 0, err[-2000:]
    rc, _, err = run_main("export", "--checkpoint", last, "--output", root / "export_ok")
    assert rc == 0 and (root / "export_ok" / "model.safetensors").is_file(), err[-2000:]
    loaded = load_head(last)
    state = torch.load(last, weights_only=True)["state_dict"]
    assert torch.equal(loaded.head.model.embed_tokens.weight, state["head.model.embed_tokens.weight"])


def test_paths_in_hyperparameters_are_allowed(tmp_path):
    """A DataModule built in Python may keep a pathlib.Path in its hparams: that global (and only such) is allowed."""
    path = tmp_path / "p.ckpt"
    torch.save({"datamodule_hyper_parameters": {"train_file": Path("/data/train.jsonl")}}, path)
    assert load_checkpoint_file(path)["datamodule_hyper_parameters"]["train_file"] == Path("/data/train.jsonl")


def test_unreadable_files_are_clear_errors(tmp_path, fitted):
    _, last, _, _, _ = fitted
    text = tmp_path / "README.md"
    text.write_text("# not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a Lightning checkpoint"):
        load_checkpoint_file(text)
    cut = tmp_path / "cut.ckpt"
    data = last.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint_file(cut)
    rc, _, err = run_main("generate", "--checkpoint", cut, "--prompt", "x")
    assert rc == 1 and "truncated" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------------
# distributed checkpoint directories (what FSDP2 with save_distributed_checkpoint writes)
# ----------------------------------------------------------------------------------------------------------------------


def _dcp_save(state: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))


def test_distributed_checkpoint_round_trip_with_the_safe_reader(tmp_path):
    state = {
        "state_dict": {"w": torch.randn(4, 3), "b": torch.arange(5)},
        "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]},
    }
    _dcp_save(state, tmp_path / "ok")
    target = {
        "state_dict": {"w": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.long)},
        "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": [0]}]},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_distributed(target, tmp_path / "ok")
    assert torch.equal(target["state_dict"]["w"], state["state_dict"]["w"])
    assert torch.equal(target["state_dict"]["b"], state["state_dict"]["b"])
    assert target["optim"]["param_groups"][0]["lr"] == 0.1
    verify_checkpoint(tmp_path / "ok")


def test_distributed_checkpoint_with_crafted_metadata_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    _dcp_save({"state_dict": {"w": torch.randn(2)}}, tmp_path / "d")
    (tmp_path / "d" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        verify_checkpoint(tmp_path / "d")
    with pytest.raises(UnsafeCheckpointError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_distributed({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "d")
    assert not marker.exists()


def test_distributed_checkpoint_with_a_crafted_item_is_refused(tmp_path):
    """Non-tensor items are stored as torch.save bytes; torch's own planner loads them with weights_only=False."""
    marker = tmp_path / "PWNED"
    _dcp_save({"extra": {"payload": _Payload(marker)}, "state_dict": {"w": torch.randn(2)}}, tmp_path / "d")
    with pytest.raises(UnsafeCheckpointError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_distributed({"extra": {"payload": None}, "state_dict": {"w": torch.zeros(2)}}, tmp_path / "d")
    assert not marker.exists()


def test_fsdp2_directory_with_crafted_meta_is_refused_by_generate_and_export(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "last.ckpt"
    _dcp_save({"state_dict": {"head.w": torch.randn(2)}}, d)
    _evil_ckpt(d / "meta.pt", marker)
    rc, _, err = run_main("generate", "--checkpoint", d, "--prompt", "x")
    assert rc == 1 and "was not loaded" in err
    rc, _, err = run_main("export", "--checkpoint", d, "--output", tmp_path / "out")
    assert rc == 1 and "was not loaded" in err
    assert not marker.exists()


def test_file_urls_and_hpc_get_the_same_checks_as_paths(fitted, tmp_path, monkeypatch):
    """file:// and hpc used to bypass the settings check and the safe read (reviewer's finding)."""
    import shutil

    _, last, evil, marker, root = fitted
    args = small_args("causal_lm", root / "logs_url", root / "cache")
    override = ["--model.init_args.config_overrides", "{rope_theta: 3.0}"]
    rc, _, err = run_main("validate", *args, *override, "--ckpt_path", f"file://{last}")
    assert rc == 1 and "rope_theta" in err and "Traceback" not in err
    rc, _, err = run_main("validate", *args, "--ckpt_path", f"file://{evil}")
    assert rc == 1 and "was not loaded" in err and "Traceback" not in err and not marker.exists()
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main("validate", *args, "--ckpt_path", "hpc")
    assert rc == 1 and "no hpc_ckpt_N.ckpt" in err
    shutil.copy(last, tmp_path / "hpc_ckpt_1.ckpt")
    rc, _, err = run_main("validate", *args, *override, "--ckpt_path", "hpc")
    assert rc == 1 and "rope_theta" in err and "Traceback" not in err
    rc, _, err = run_main("validate", *args, "--ckpt_path", "registry")
    assert rc == 1 and "remote checkpoints are not read" in err


def test_legacy_format_and_directories_are_handled(fitted, tmp_path):
    _, last, _, _, _ = fitted
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(last, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert load_checkpoint_file(legacy, mmap=True)["global_step"] == torch.load(last, weights_only=True)["global_step"]
    with pytest.raises(ValueError, match="is a directory, not a checkpoint file"):
        load_checkpoint_file(tmp_path)


def test_rank_local_dcp_metadata_is_checked_too(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "last.ckpt"
    _dcp_save({"state_dict": {"head.w": torch.randn(2)}}, d)
    torch.save({"phi3_lightning": {}}, d / "meta.pt")
    (d / ".metadata").rename(d / "__0.metadata")
    (d / "__0.metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        verify_checkpoint(d)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_distributed({"state_dict": {"head.w": torch.zeros(2)}}, d)
    assert not marker.exists()


def test_the_python_api_refuses_a_crafted_ckpt_too(fitted, tmp_path):
    """A plain ``pl.Trainer`` (no CLI, so none of its checkpoint IO) resuming or evaluating one of our modules from a
    crafted file, and ``load_from_checkpoint``: Lightning's loader ran the payload when asked ``weights_only=False``,
    and without it refused only by torch's default (an unclear error, and a ``Path`` in the hyper-parameters
    refused); the module installs the safe loader before the checkpoint is read."""
    from phi3_lightning.data import CausalLMDataModule
    from phi3_lightning.modules import CausalLMModule

    _, last, evil, marker, root = fitted

    def trainer():
        return quiet_trainer(max_steps=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path)

    def data():
        return CausalLMDataModule(cache_dir=root / "cache", progress=False, max_length=32, max_files=2, batch_size=2)

    for call in ("fit", "validate"):
        for asked in (None, False):  # Lightning's weights_only=False ran the payload: the safe loader ignores it
            with pytest.raises(UnsafeCheckpointError, match="posix.system"):
                getattr(trainer(), call)(
                    CausalLMModule(model="tiny"), datamodule=data(), ckpt_path=evil, weights_only=asked
                )
            assert not marker.exists(), (call, asked)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        CausalLMModule.load_from_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only set to False"):
        CausalLMModule.load_from_checkpoint(last, weights_only=False)
    # the real checkpoint still loads through both
    loaded = CausalLMModule.load_from_checkpoint(last)
    state = torch.load(last, weights_only=True)["state_dict"]
    assert torch.equal(loaded.head.model.embed_tokens.weight, state["head.model.embed_tokens.weight"])

"""Nothing half-written, nothing deleted that we did not write (issue 11).

* ``phi3_lightning.atomic``: staging names carry the writer's pid; the next write to a target removes a killed
  writer's staging entries, never a live writer's.
* Fault injection (subprocesses, ``kill -9`` from inside the child at the N-th call of ``os.replace`` /
  ``save_file`` / ``shutil.rmtree`` / ``os.fsync``): ``save_pretrained`` over an older sharded save, ``export
  --overwrite`` over an older export and a Lightning ``.ckpt`` written by ``AtomicCheckpointIO`` leave exactly the
  old or exactly the new weights (tensors compared), never a mix; a swap killed between its two renames is
  recovered (with a warning naming the interrupted save) by the next load.
* ``from_pretrained`` refuses an index naming shards outside its directory or tensors its shards lack.
* ``export --overwrite`` (and ``--lora_only``) replaces only a previous export (its ``phi3_lightning.json`` lists the
  files it wrote): a directory that is not one (a downloaded model), or one holding anything else (even named like a
  shard), is refused and left intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from phi3_lightning import Phi3ForCausalLM
from phi3_lightning.atomic import atomic_write_text, staged_directory, staging_path
from phi3_lightning.cli import main as cli_main
from phi3_lightning.model.checkpoint import SAFE_INDEX
from phi3_lightning.modules import AtomicCheckpointIO
from phi3_lightning.modules.base import CHECKPOINT_KEY

from .model.shapes import config

ROOT = Path(__file__).resolve().parents[1]
SHARD = "20KB"  # the mini-4k shape in fp32 is ~90 KB: 6 shards


def _model(seed: int) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    return Phi3ForCausalLM(config("mini-4k")).eval()


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


# ------------------------------------------------------------------------------------------------ stale staging


def test_next_write_removes_a_dead_writers_staging_but_not_a_live_one(tmp_path):
    target = tmp_path / "cache.json"
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = staging_path(target).name.split(".")[-3]  # this machine's tag
        stale = target.with_name(f".cache.json.{dead}.{host}.0badc0de.tmp")
        alive = target.with_name(f".cache.json.{live.pid}.{host}.600dc0de.tmp")
        other_host = target.with_name(f".cache.json.{dead}.{'0' * 8 if host != '0' * 8 else '1' * 8}.12345678.tmp")
        unrelated = tmp_path / ".cache.json.bak"
        for p in (stale, alive, other_host, unrelated):
            p.write_text("x")
        atomic_write_text(target, "new")
        assert target.read_text() == "new"
        assert not stale.exists()
        assert alive.exists() and other_host.exists() and unrelated.exists()

        # the same for a directory target: a dead writer's staging directory goes, a live one's stays
        out = tmp_path / "export"
        stale_dir = out.with_name(f".export.{dead}.{host}.0badc0de.tmp")
        live_dir = out.with_name(f".export.{live.pid}.{host}.600dc0de.tmp")
        for d in (stale_dir, live_dir):
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"partial")
        with staged_directory(out) as tmp:
            assert tmp.name.startswith(f".export.{os.getpid()}.") and tmp.name.endswith(".tmp")
            (tmp / "a").write_text("a")
        assert (out / "a").read_text() == "a"
        assert not stale_dir.exists() and live_dir.is_dir()
    finally:
        live.kill()
        live.wait()


def test_staged_directory_failure_leaves_target_untouched(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_directory(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert [p.name for p in out.iterdir()] == ["keep"]


# ------------------------------------------------------------------------------------------------ save_pretrained


def test_save_pretrained_keeps_user_files_and_drops_old_weights(tmp_path):
    out = tmp_path / "hf"
    _model(0).save_pretrained(out, max_shard_size=SHARD)
    assert len(json.loads((out / SAFE_INDEX).read_text())["weight_map"]) > 0
    (out / "tokenizer.json").write_text('{"user": true}')
    (out / "notes").mkdir()
    (out / "notes" / "README.md").write_text("mine")
    new = _model(1)
    new.save_pretrained(out)  # unsharded now
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"user": true}'
    assert (out / "notes" / "README.md").read_text() == "mine"
    assert _siblings(out) == []
    assert _same(_state(Phi3ForCausalLM.from_pretrained(out)), _state(new))


def test_index_naming_a_shard_outside_the_directory_is_refused(tmp_path):
    out = tmp_path / "hf"
    _model(0).save_pretrained(out, max_shard_size=SHARD)
    index = json.loads((out / SAFE_INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "evil.safetensors").write_bytes((out / first).read_bytes())  # exists, and holds the tensors
    for bad in ("../evil.safetensors", str(tmp_path / "evil.safetensors"), "sub/../../evil.safetensors"):
        wm = {k: (bad if v == first else v) for k, v in index["weight_map"].items()}
        (out / SAFE_INDEX).write_text(json.dumps({"metadata": index["metadata"], "weight_map": wm}))
        with pytest.raises(ValueError, match="outside the checkpoint directory") as e:
            Phi3ForCausalLM.from_pretrained(out)
        assert repr(bad)[1:-1] in str(e.value)


def test_index_listing_a_tensor_its_shard_lacks_is_refused(tmp_path):
    out = tmp_path / "hf"
    _model(0).save_pretrained(out, max_shard_size=SHARD)
    index = json.loads((out / SAFE_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    (out / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{name}.*are in {files[1]}.*does not hold them"):
        Phi3ForCausalLM.from_pretrained(out)


# ------------------------------------------------------------------------------------------------ fault injection

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import shutil
    import torch
    import safetensors.torch

    what, fn, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    calls = [0]

    def patch(mod, attr):
        real = getattr(mod, attr)
        def wrapper(*a, **k):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        setattr(mod, attr, wrapper)

    {"replace": lambda: patch(os, "replace"), "save_file": lambda: patch(safetensors.torch, "save_file"),
     "rmtree": lambda: patch(shutil, "rmtree"), "fsync": lambda: patch(os, "fsync")}[fn]()
    from phi3_lightning import Phi3ForCausalLM
    from tests.model.shapes import config

    args = sys.argv[4:]
    if what == "export":  # the new version of an export
        from phi3_lightning.modules.loading import export_checkpoint
        export_checkpoint(args[0], args[1], max_shard_size=SHARD, overwrite=True)
    else:
        torch.manual_seed(1)  # the new version: _model(1)
        model = Phi3ForCausalLM(config("mini-4k")).eval()
        if what == "save_pretrained":
            model.save_pretrained(args[0], max_shard_size=SHARD)
        else:
            from phi3_lightning.modules import AtomicCheckpointIO
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            AtomicCheckpointIO().save_checkpoint({"state_dict": state}, args[0])
    print("finished without being killed")
    """
)


def _kill_during(what: str, fn: str, nth: int, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", _CHILD.replace("SHARD", repr(SHARD)), what, fn, str(nth), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == -9, f"the child was not killed at {fn} #{nth}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    return r


# (function whose n-th call kills, n, what load must give): after shard 1, after the last shard (before the swap),
# between the two renames of the swap, while removing the old directory after the swap.
SAVE_MOMENTS = [("save_file", 2, "old"), ("replace", 1, "old"), ("replace", 2, "new"), ("rmtree", 1, "new")]


@pytest.mark.slow
@pytest.mark.parametrize("fn,nth,expect", SAVE_MOMENTS, ids=[f"{f}{n}" for f, n, _ in SAVE_MOMENTS])
def test_save_pretrained_killed_leaves_old_or_new_never_a_mix(tmp_path, fn, nth, expect):
    out = tmp_path / "hf"
    old, new = _model(0), _model(1)
    old.save_pretrained(out, max_shard_size=SHARD)
    assert len(set(json.loads((out / SAFE_INDEX).read_text())["weight_map"].values())) >= 4
    (out / "tokenizer.json").write_text("user file")
    _kill_during("save_pretrained", fn, nth, out)

    with pytest.warns(UserWarning, match="interrupted") if (fn, nth) == ("replace", 2) else _no_warning():
        back = _state(Phi3ForCausalLM.from_pretrained(out))
    assert _same(back, _state(old if expect == "old" else new))
    assert (out / "tokenizer.json").read_text() == "user file"

    # the next save removes the killed writer's leftovers and succeeds
    _model(2).save_pretrained(out, max_shard_size=SHARD)
    assert _siblings(out) == []
    assert _same(_state(Phi3ForCausalLM.from_pretrained(out)), _state(_model(2)))


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _lightning_ckpt(path: Path, model: Phi3ForCausalLM) -> Path:
    torch.save(
        {
            "state_dict": {f"head.{k}": v for k, v in model.state_dict().items()},
            CHECKPOINT_KEY: {"task": "causal_lm", "config": model.config.to_dict(), "tokenizer": "byte"},
        },
        path,
    )
    return path


# export stages the same way as save_pretrained (whose four moments are tested above); each child here imports
# Lightning, so two moments: after shard 3, and between the two renames (os.replace #2) of the swap
EXPORT_MOMENTS = [("save_file", 3, "old"), ("replace", 2, "new")]


@pytest.mark.slow
@pytest.mark.parametrize("fn,nth,expect", EXPORT_MOMENTS, ids=[f"{f}{n}" for f, n, _ in EXPORT_MOMENTS])
def test_export_overwrite_killed_leaves_old_or_new_never_a_mix(tmp_path, fn, nth, expect):
    from phi3_lightning.modules.loading import export_checkpoint

    old, new = _model(0), _model(1)
    out = tmp_path / "exported"
    export_checkpoint(_lightning_ckpt(tmp_path / "old.ckpt", old), out, max_shard_size=SHARD)
    _kill_during("export", fn, nth, _lightning_ckpt(tmp_path / "new.ckpt", new), out)
    with pytest.warns(UserWarning, match="interrupted") if (fn, nth) == ("replace", 2) else _no_warning():
        back = _state(Phi3ForCausalLM.from_pretrained(out))
    assert _same(back, _state(old if expect == "old" else new))
    assert json.loads((out / "phi3_lightning.json").read_text())["exported_from"].endswith(f"{expect}.ckpt")
    export_checkpoint(tmp_path / "new.ckpt", out, max_shard_size=SHARD, overwrite=True)
    assert _siblings(out) == []


@pytest.mark.slow
def test_lightning_ckpt_killed_leaves_old_file_and_next_save_cleans_up(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": _state(_model(0))}, path)
    _kill_during("ckpt", "fsync", 1, path)  # the new file is written, not yet flushed and renamed
    assert _same(torch.load(path, weights_only=True)["state_dict"], _state(_model(0)))
    assert len(_siblings(path)) == 1  # the killed writer's complete-but-unrenamed staging file
    AtomicCheckpointIO().save_checkpoint({"state_dict": _state(_model(1))}, path)
    assert _siblings(path) == []
    assert _same(torch.load(path, weights_only=True)["state_dict"], _state(_model(1)))


# ------------------------------------------------------------------------------------------------ export refusal


def _export(ckpt: Path, out: Path, *extra: str) -> int:
    return cli_main(["export", "--checkpoint", str(ckpt), "--output", str(out), *extra])


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _lora_ckpt(path: Path, seed: int) -> Path:
    from phi3_lightning.model.lora import LoRAConfig, apply_lora

    model = _model(seed)
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    torch.save(
        {
            "state_dict": {f"head.{k}": v for k, v in model.state_dict().items()},
            CHECKPOINT_KEY: {
                "task": "causal_lm",
                "config": model.config.to_dict(),
                "tokenizer": "byte",
                "lora": {"r": 2, "alpha": 4},
            },
        },
        path,
    )
    return path


def test_export_overwrite_refuses_a_directory_with_files_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    ckpt = _lightning_ckpt(tmp_path / "m.ckpt", _model(0))
    assert _export(ckpt, out) == 0  # a previous export ...
    (out / "thesis.tex").write_text("years of work")  # ... with a user's file in it
    before = _files(out)
    assert _export(ckpt, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "thesis.tex" in err and "config.json" not in err.split("(")[1].split(")")[0]
    assert _files(out) == before

    assert _export(ckpt, out) == 1  # without --overwrite: the user's file is named too
    assert "thesis.tex" in capsys.readouterr().err and _files(out) == before

    (out / "thesis.tex").unlink()  # only an earlier export's files left: --overwrite replaces them
    assert _export(ckpt, out) == 1
    err = capsys.readouterr().err
    assert "pass --overwrite " in err and "--overwrite true" not in err
    assert _export(ckpt, out, "--overwrite") == 0
    assert _same(_state(Phi3ForCausalLM.from_pretrained(out)), _state(_model(0)))


@pytest.mark.parametrize("previous_export", [False, True], ids=["alone", "in_a_previous_export"])
def test_export_overwrite_keeps_a_user_file_named_like_an_export_shard(tmp_path, capsys, previous_export):
    """Reviewer case 1: ``model-extra.safetensors`` matches no file an export writes; it is refused, not deleted."""
    out = tmp_path / "out"
    ckpt = _lightning_ckpt(tmp_path / "m.ckpt", _model(0))
    if previous_export:
        assert _export(ckpt, out) == 0
    out.mkdir(exist_ok=True)
    (out / "model-extra.safetensors").write_text("precious\n")
    before = _files(out)
    assert _export(ckpt, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "model-extra.safetensors" in err
    assert ("not a previous export" in err) is not previous_export
    assert _files(out) == before


@pytest.mark.parametrize("lora_only", [False, True], ids=["full", "lora_only"])
def test_export_overwrite_refuses_a_downloaded_hugging_face_directory(tmp_path, capsys, lora_only):
    """Reviewer case 2: a model directory (config, shards, index, the user's tokenizer and generation config) with
    no phi3_lightning.json is not a previous export: refused with every file intact."""
    out = tmp_path / "Phi-3-mini"
    _model(1).save_pretrained(out, max_shard_size=SHARD)
    (out / "tokenizer.json").write_text('{"model": "the user\'s"}')
    (out / "generation_config.json").write_text('{"eos_token_id": 32000}')
    assert (out / SAFE_INDEX).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    before = _files(out)
    ckpt = _lora_ckpt(tmp_path / "m.ckpt", 0) if lora_only else _lightning_ckpt(tmp_path / "m.ckpt", _model(0))
    assert _export(ckpt, out, "--overwrite", *(["--lora_only"] if lora_only else [])) == 1
    err = capsys.readouterr().err
    assert "not a previous export" in err and "new or empty output directory" in err
    assert _files(out) == before


def test_export_overwrite_replaces_a_previous_export_and_only_its_files(tmp_path):
    old, new = _model(0), _model(1)
    out = tmp_path / "out"
    assert _export(_lightning_ckpt(tmp_path / "old.ckpt", old), out, "--max_shard_size", SHARD) == 0
    info = json.loads((out / "phi3_lightning.json").read_text())
    assert info["files"] == sorted(p.name for p in out.iterdir()) and len(info["files"]) > 4  # shards + index
    assert _export(_lightning_ckpt(tmp_path / "new.ckpt", new), out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "phi3_lightning.json"]
    assert _same(_state(Phi3ForCausalLM.from_pretrained(out)), _state(new))

    # an export written before the file list was recorded: the names an export writes are replaced
    info = json.loads((out / "phi3_lightning.json").read_text())
    del info["files"]
    (out / "phi3_lightning.json").write_text(json.dumps(info))
    assert _export(tmp_path / "old.ckpt", out, "--overwrite") == 0
    assert _same(_state(Phi3ForCausalLM.from_pretrained(out)), _state(old))

    # --lora_only over a previous adapter export
    adapter = tmp_path / "adapter"
    assert _export(_lora_ckpt(tmp_path / "l0.ckpt", 0), adapter, "--lora_only") == 0
    first = _files(adapter)
    assert json.loads(first["phi3_lightning.json"])["files"] == sorted(first)
    assert _export(_lora_ckpt(tmp_path / "l1.ckpt", 1), adapter, "--lora_only", "--overwrite") == 0
    assert sorted(_files(adapter)) == sorted(first)
    assert json.loads((adapter / "phi3_lightning.json").read_text())["exported_from"].endswith("l1.ckpt")


def test_swap_interrupted_between_renames_is_recovered_or_explained(tmp_path):
    """The states a kill between the two renames leaves, built by hand: new staging + old aside -> the next save
    finishes the swap first (and keeps the user's file); old aside alone -> moved back; a live writer -> an error
    naming the process, nothing touched."""
    out = tmp_path / "hf"
    host = staging_path(out).name.split(".")[-3]
    token = f"{_dead_pid()}.{host}.0badc0de"
    _model(0).save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "tokenizer.json").write_text("user file")
    _model(1).save_pretrained(tmp_path / "new")
    os.link(tmp_path / "old" / "tokenizer.json", tmp_path / "new" / "tokenizer.json")  # carried before the swap
    os.replace(tmp_path / "old", staging_path(out, "old", token))
    os.replace(tmp_path / "new", staging_path(out, "tmp", token))
    with pytest.warns(UserWarning, match=r"save into .*hf was interrupted.*restored the complete new version"):
        _model(2).save_pretrained(out)
    assert _siblings(out) == [] and (out / "tokenizer.json").read_text() == "user file"
    assert _same(_state(Phi3ForCausalLM.from_pretrained(out)), _state(_model(2)))

    os.replace(out, staging_path(out, "old", token))  # only the old one aside: it is moved back
    with pytest.warns(UserWarning, match="restored the previous version"):
        back = Phi3ForCausalLM.from_pretrained(out)
    assert _same(_state(back), _state(_model(2)))

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        aside = staging_path(out, "old", f"{live.pid}.{host}.600dc0de")
        os.replace(out, aside)
        with pytest.raises(FileExistsError, match=f"being replaced right now by process {live.pid}"):
            Phi3ForCausalLM.from_pretrained(out)
        assert aside.is_dir() and not out.exists()
    finally:
        live.kill()
        live.wait()

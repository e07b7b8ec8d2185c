"""Two CPU processes (gloo) through ``python -m phi3_lightning fit``: DDP and FSDP2 (ModelParallelStrategy) each
save a checkpoint per epoch, a second run resumes from the first epoch's checkpoint, and both end with the loss of
the uninterrupted run. FSDP2 builds on the meta device and receives the pretrained weights from rank 0."""

from __future__ import annotations

import math

import pytest
import torch

from phi3_lightning.model import Phi3ForCausalLM

from .modules.helpers import CONFIGS, run_main, run_module, scalars

pytestmark = pytest.mark.slow

OVERLAY = """\
trainer:
  max_steps: -1
  max_epochs: 2
  limit_train_batches: 3
  limit_val_batches: 2
  val_check_interval: 1.0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_top_k: -1
        every_n_epochs: 1
        filename: "{epoch}"
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "two_epochs.yaml").write_text(OVERLAY)
    torch.manual_seed(0)
    Phi3ForCausalLM.from_config("tiny").save_pretrained(root / "init")
    return root


def _fit(root, strategy: str, *extra: str):
    proc = run_module(
        "fit",
        "--config",
        CONFIGS / "causal_lm.yaml",
        "--config",
        CONFIGS / "strategies" / f"{strategy}.yaml",
        "--config",
        root / "two_epochs.yaml",
        "--trainer.logger.init_args.save_dir",
        root / "logs",
        "--model.init_args.model",
        root / "init",
        "--data.init_args.max_length",
        "64",
        "--data.init_args.max_files",
        "8",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.cache_dir",
        root / "cache",
        "--data.init_args.progress",
        "false",
        *extra,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _final(run_dir):
    tags = scalars(run_dir)
    return tags["train/loss_step"][-1], tags["val/loss"][-1]


def _resume_matches(root, strategy: str, *extra: str):
    run = root / "logs" / f"causal_lm+{strategy}+two_epochs" / "sdpa"
    _fit(root, strategy, *extra)  # uninterrupted: 2 epochs, a checkpoint after each
    first_epoch = run / "version_0" / "checkpoints" / "epoch=0.ckpt"
    assert first_epoch.exists()
    _fit(root, strategy, *extra, "--ckpt_path", first_epoch)  # resumed: epoch 2 only, in version_1
    (step_a, loss_a), (vstep_a, val_a) = _final(run / "version_0")
    (step_b, loss_b), (vstep_b, val_b) = _final(run / "version_1")
    assert step_a == step_b == 5 and vstep_a == vstep_b
    assert [s for s, _ in scalars(run / "version_1")["train/loss_step"]] == [3, 4, 5]  # only the second epoch
    assert math.isclose(loss_a, loss_b, rel_tol=1e-5), (loss_a, loss_b)
    assert math.isclose(val_a, val_b, rel_tol=1e-5), (val_a, val_b)
    return run, loss_a, val_a


@pytest.fixture(scope="module")
def ddp(setup):
    return _resume_matches(setup, "ddp")


def test_ddp_resume_equals_uninterrupted(ddp):
    run, _, _ = ddp
    tags = scalars(run / "version_0")
    assert tags["perf/tokens_per_sec"] and all(v > 0 for _, v in tags["perf/tokens_per_sec"])


def test_fsdp2_resume_equals_uninterrupted_and_matches_ddp(setup, ddp, tmp_path):
    run, loss, val = _resume_matches(setup, "fsdp2", "--model.init_args.meta_init", "true")
    _, ddp_loss, ddp_val = ddp
    # same data split and initial weights (meta init + rank-0 broadcast): FSDP2 trains like DDP
    assert math.isclose(loss, ddp_loss, rel_tol=1e-4) and math.isclose(val, ddp_val, rel_tol=1e-4)
    sharded = run / "version_0" / "checkpoints" / "epoch=1.ckpt"
    assert sharded.is_dir() and (sharded / "meta.pt").is_file()  # a distributed checkpoint, renamed into place
    assert not list(sharded.parent.glob(".*tmp"))
    rc, _, err = run_main("export", "--checkpoint", sharded, "--output", tmp_path / "hf")
    assert rc == 0, err
    exported = Phi3ForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.lm_head.weight.shape == (512, 128)


def test_two_process_validate_counts_each_example_once(setup, tmp_path):
    """21 validation examples over 2 processes: Lightning's DistributedSampler repeats one to make 22; the repeat
    must not count, so val/loss and val/perplexity equal the single-process ones (up to reduction order)."""
    import json

    g = torch.Generator().manual_seed(1)
    letters = "abcdefgh "
    docs = []
    for _ in range(21):
        n = int(torch.randint(3, 26, (1,), generator=g))
        docs.append("".join(letters[int(i)] for i in torch.randint(0, len(letters), (n,), generator=g)))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in docs))
    results = {}
    for devices in (1, 2):
        logs = tmp_path / f"logs{devices}"
        proc = run_module(
            "validate",
            "--config",
            CONFIGS / "causal_lm.yaml",
            "--trainer.devices",
            devices,
            "--trainer.strategy",
            "ddp",
            "--trainer.limit_val_batches",
            "null",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            logs,
            "--model.init_args.model",
            setup / "init",
            "--data.init_args.train_file",
            data,
            "--data.init_args.val_file",
            data,
            "--data.init_args.pack",
            "false",
            "--data.init_args.max_length",
            "32",
            "--data.init_args.eval_batch_size",
            "5",
            "--data.init_args.progress",
            "false",
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        (run,) = {p.parent for p in logs.rglob("events.out.tfevents.*")}
        tags = scalars(run)
        results[devices] = (tags["val/loss"][-1][1], tags["val/perplexity"][-1][1])
    assert math.isclose(results[1][0], results[2][0], rel_tol=1e-6), results
    assert math.isclose(results[1][1], results[2][1], rel_tol=1e-5), results

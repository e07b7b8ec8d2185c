"""The numbers a run reports are what they claim to be: each one recomputed here by brute force (one example at a
time through the model) and compared with what validate / test / fit report."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from phi3_lightning.data.collate import PaddingCollator
from phi3_lightning.modules import CausalLMModule

from .helpers import quiet_trainer


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(3, 250, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _brute_token_mean(head, examples) -> float:
    """Mean next-token cross-entropy over every target of every example, each example run alone (no padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor(ex["input_ids"])[None]
            logits = head(input_ids=ids).logits[0, :-1].double()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def test_val_loss_is_the_token_mean_with_left_padding_and_a_partial_last_batch():
    """val/loss is the mean over target tokens and val/perplexity its exp, whatever the padding side: with left
    padding the first real token of a padded row is predicted from a pad (not a target), and must not be counted in
    the weight of its batch either (it was: every left-padded row added one phantom target to its batch's weight)."""
    torch.manual_seed(0)
    examples = _examples(11)
    module = CausalLMModule(model="tiny", attn_implementation="eager")
    module.configure_model()
    module.eval()
    expected = _brute_token_mean(module.head, examples)
    for side in ("right", "left"):
        loader = DataLoader(examples, batch_size=4, collate_fn=PaddingCollator(0, padding_side=side))
        result = quiet_trainer().validate(module, dataloaders=loader, verbose=False)[0]
        assert math.isclose(result["val/loss"], expected, rel_tol=1e-5), (side, result, expected)
        assert math.isclose(result["val/perplexity"], math.exp(expected), rel_tol=1e-5), (side, result)


def test_train_loss_step_under_gradient_accumulation_is_the_loss_of_the_step_s_batches(tmp_path):
    """With accumulate_grad_batches=2, train/loss_step at step k is the token-weighted loss of the two batches that
    made optimizer step k (not the last micro-batch alone, not scaled by 1/2); perplexity_step is its exp."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    examples = _examples(8, seed=3)
    module = CausalLMModule(model="tiny", attn_implementation="eager")
    seen: list[tuple[int, float, int]] = []  # (global step, batch loss, batch targets), recorded before the update

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                out = pl_module(batch, return_logits=False)
            seen.append((trainer.global_step, float(out.loss), int((batch["labels"][:, 1:] != -100).sum())))

    loader = DataLoader(examples, batch_size=2, collate_fn=PaddingCollator(0))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[Record()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    logged = {}
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss_step"):
                logged[int(row["step"])] = (float(row["train/loss_step"]), float(row["train/perplexity_step"]))
    assert sorted(logged) == [0, 1]
    for step in (0, 1):
        batches = [(loss, n) for s, loss, n in seen if s == step]
        assert len(batches) == 2
        expected = sum(loss * n for loss, n in batches) / sum(n for _, n in batches)
        assert math.isclose(logged[step][0], expected, rel_tol=1e-5), (step, logged, batches)
        assert math.isclose(logged[step][1], math.exp(expected), rel_tol=1e-5)


def test_an_eval_split_smaller_than_the_process_count_is_refused():
    """With fewer examples than processes a process would see only the sampler's repeats, count nothing and never
    log, leaving the others waiting at the epoch-end sync: a clear error instead. With as many examples as
    processes every process has one of its own and nothing is left out."""
    from torch.utils.data import DistributedSampler

    def loader(n, rank):
        data = list(range(n))
        return DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False))

    with pytest.raises(ValueError, match=r"1 example\(s\) for 2 processes.*--trainer.devices 1"):
        CausalLMModule._repeated_indices(loader(1, 1))
    assert CausalLMModule._repeated_indices(loader(2, 1)) is None
    assert CausalLMModule._repeated_indices(loader(3, 1)).tolist() == [0]  # rank 1 gets [1, 0]: 0 is the repeat


def _indexed(examples: list[dict]) -> list[dict]:
    return [{**ex, "index": i} for i, ex in enumerate(examples)]


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_each_of_several_eval_dataloaders_reports_the_token_mean_of_its_own_examples(stage):
    """validate / test with three dataloaders: ``{stage}/loss/dataloader_idx_k`` is the token mean of loader k's
    examples alone (it was a crash: validation_step / test_step took no dataloader_idx; then every loader after the
    first reported the running mean over all loaders so far, the metrics being shared)."""
    torch.manual_seed(0)
    module = CausalLMModule(model="tiny", attn_implementation="eager")
    module.configure_model()
    module.eval()
    splits = [_indexed(_examples(n, seed=s)) for n, s in ((7, 1), (4, 2), (5, 3))]
    loaders = [DataLoader(ex, batch_size=2, collate_fn=PaddingCollator(0)) for ex in splits]
    results = getattr(quiet_trainer(), stage)(module, dataloaders=loaders, verbose=False)
    prefix = "val" if stage == "validate" else "test"
    assert len(results) == 3
    for k, (examples, result) in enumerate(zip(splits, results)):
        expected = _brute_token_mean(module.head, examples)
        assert math.isclose(result[f"{prefix}/loss/dataloader_idx_{k}"], expected, rel_tol=1e-5), (k, result)
        assert math.isclose(result[f"{prefix}/perplexity/dataloader_idx_{k}"], math.exp(expected), rel_tol=1e-5)


class _RecordTransfers(CausalLMModule):
    """Records the ``index`` of every batch as it is handed to the device (after ``on_before_batch_transfer``)."""

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        stage = "val" if self.trainer.validating else "test"
        self.__dict__.setdefault("transferred", []).append([stage, dataloader_idx, batch["index"].tolist()])
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


def _several_loaders(devices: int) -> tuple[dict[str, float], list]:
    """validate + test of a tiny model on three loaders of 4, 7 and 5 examples (batches of 2) on ``devices`` CPU
    processes: ({metric key: value}, this process's transferred batch indices)."""
    torch.manual_seed(0)
    module = _RecordTransfers(model="tiny", attn_implementation="eager")
    splits = [_indexed(_examples(n, seed=s)) for n, s in ((4, 1), (7, 2), (5, 3))]
    loaders = [DataLoader(ex, batch_size=2, collate_fn=PaddingCollator(0)) for ex in splits]
    trainer = quiet_trainer(devices=devices, strategy="ddp" if devices > 1 else "auto")
    results = trainer.validate(module, dataloaders=loaders, verbose=False)
    results += trainer.test(module, dataloaders=loaders, verbose=False)
    return {k: v for r in results for k, v in r.items()}, module.transferred


_TWO_PROCESSES = """\
import json, sys
import torch.distributed as dist
from tests.modules.test_reported_numbers import _several_loaders

results, transferred = _several_loaders(2)
with open(sys.argv[1] + f".{dist.get_rank()}", "w") as f:
    json.dump({"results": results, "transferred": transferred}, f)
"""


@pytest.mark.slow
def test_two_process_eval_with_several_dataloaders_counts_each_example_once(tmp_path):
    """Two gloo processes, validate and test with three dataloaders of 4, 7 and 5 examples: the DistributedSampler
    repeats example 0 of the second and third on rank 1 to even out the processes; each loader's repeats are left
    out of its own metrics, so every ``val/...`` and ``test/...`` value equals the single-process one (the de-dup
    used to be skipped whenever there was more than one loader). The repeats are dropped on the host, before the
    batch goes to the device (no device sync to decide): rank 1 transfers [5] (not [5, 0]); a batch of repeats only
    ([0] of the third loader) is still transferred and run, so the processes stay in step."""
    import json
    import os
    import subprocess
    import sys

    from .helpers import ROOT

    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESSES)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected, _ = _several_loaders(1)
    assert len(expected) == 12, expected  # {val, test} x {loss, perplexity} x 3 loaders
    rank1 = json.loads(Path(f"{out}.1").read_text())
    for rank in (0, 1):
        results = json.loads(Path(f"{out}.{rank}").read_text())["results"]
        assert results.keys() == expected.keys()
        for key, value in expected.items():  # (up to reduction order; a counted repeat moves them by ~5e-4)
            tol = 1e-6 if "/loss/" in key else 1e-5
            assert math.isclose(results[key], value, rel_tol=tol), (rank, key, results, expected)
    for stage in ("val", "test"):
        seen = [[i for s, k, i in rank1["transferred"] if s == stage and k == loader] for loader in range(3)]
        assert seen == [[[1, 3]], [[1, 3], [5]], [[1, 3], [0]]], (stage, seen)


class _DataModuleWithItsOwnTransferHook(pl.LightningDataModule):
    """A user DataModule that overrides ``on_before_batch_transfer``: Lightning then calls it instead of the
    module's (with a warning), so the module's host-side screening of the sampler's repeats never runs."""

    def __init__(self, examples: list[dict]) -> None:
        super().__init__()
        self.examples = examples

    def val_dataloader(self):
        return DataLoader(self.examples, batch_size=2, collate_fn=PaddingCollator(0))

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch


def test_sampler_repeats_are_left_out_even_when_a_datamodule_hook_replaces_the_modules(monkeypatch):
    """The distributed sampler's repeats are normally dropped in the module's ``on_before_batch_transfer``; with a
    DataModule that has its own hook (Lightning then skips the module's) they are dropped in the step instead.
    One process standing in for a rank whose sampler repeated examples 1 and 4 (batches [0, 1], [2, 3], [4]):
    val/loss is the token mean of examples 0, 2 and 3 alone."""
    import warnings

    torch.manual_seed(0)
    module = CausalLMModule(model="tiny", attn_implementation="eager")
    module.configure_model()
    module.eval()
    examples = _indexed(_examples(5, seed=4))
    monkeypatch.setattr(CausalLMModule, "_repeats_per_loader", classmethod(lambda cls, loaders: [torch.tensor([1, 4])]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*on_before_batch_transfer.*")
        (result,) = quiet_trainer().validate(
            module, datamodule=_DataModuleWithItsOwnTransferHook(examples), verbose=False
        )
    expected = _brute_token_mean(module.head, [examples[i] for i in (0, 2, 3)])
    assert math.isclose(result["val/loss"], expected, rel_tol=1e-5), (result, expected)

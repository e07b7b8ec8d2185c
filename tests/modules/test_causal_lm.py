"""CausalLMModule.predict writes the head's per-row losses (parity with cross-entropy on the full logits)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from phi3_lightning.modules import CausalLMModule


def test_predict_rows_are_per_row_cross_entropy():
    torch.manual_seed(0)
    module = CausalLMModule(model="tiny")
    module.configure_model()
    module.eval()
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :4] = -100
    labels[2] = -100
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "index": torch.tensor([7, 8, 9]),
    }
    out = module.predict_step(batch, 0)
    rows = module.prediction_rows(out, None)
    with torch.no_grad():
        logits = module.head(ids).logits.double()
    for i, row in enumerate(rows):
        targets = labels[i, 1:]
        keep = targets != -100
        assert row["index"] == 7 + i and row["tokens"] == int(keep.sum())
        if not keep.any():
            assert row["loss"] is None and row["perplexity"] is None
            continue
        want = float(F.cross_entropy(logits[i, :-1][keep], targets[keep]))
        assert abs(row["loss"] - want) < 1e-5 and abs(row["perplexity"] - math.exp(want)) < 1e-3


def test_cli_fit_with_fused_compile_kernels_trains_and_records_the_setting(tmp_path, monkeypatch):
    """``--model.init_args.fused_kernels compile`` parses, trains 2 steps through the fused path, and is recorded in
    config.yaml, hparams.yaml and the run report; an unknown set is a one-line error with a suggestion."""
    from phi3_lightning.model import fused

    from .helpers import finite, run_main, scalars, small_args, texts

    logs, cache = tmp_path / "logs", tmp_path / "cache"
    args = [*small_args("causal_lm", logs, cache, steps=2, val_every=2), "--trainer.limit_val_batches", "1"]
    calls = []
    # the fused functions run uncompiled here (a compile costs seconds on the CPU; tests/model/test_fused.py checks
    # the compiled numbers): this checks the option's plumbing
    monkeypatch.setattr(fused._Compiled, "__call__", lambda self, *a: calls.append(self.__name__) or self.fn(*a))
    rc, _, err = run_main("fit", *args, "--model.init_args.fused_kernels", "compile")
    assert rc == 0, err[-3000:]
    assert {"compiled_rms_norm", "compiled_swiglu", "compiled_rotate_qk"} <= set(calls)  # the fused path ran
    run = logs / "causal_lm" / "sdpa" / "version_0"
    assert finite(scalars(run)["train/loss_step"])
    assert "fused_kernels: compile" in (run / "config.yaml").read_text()
    assert "fused_kernels: compile" in (run / "hparams.yaml").read_text()
    assert "| fused_kernels | compile |" in texts(run)["run/text_summary"]

    rc, _, err = run_main("fit", *args, "--model.init_args.fused_kernels", "ligr")
    assert rc == 1 and "unknown fused_kernels='ligr'" in err and "did you mean liger" in err
    assert "Traceback" not in err


def test_out_of_vocabulary_labels_are_refused_on_the_host_before_transfer():
    """A DataModule of the user's own with labels >= vocab_size: a clear error while the batch is still on the CPU
    (on_before_batch_transfer), so a GPU run needs no per-step device sync for the check and never hits a device
    assert; the ignore index -100 is allowed."""
    module = CausalLMModule(model="tiny")
    vocab = module.config.vocab_size
    ids = torch.randint(0, vocab, (2, 6))
    labels = ids.clone()
    labels[:, 0] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert module.on_before_batch_transfer(batch, 0) is batch
    labels[0, 4] = vocab
    import pytest

    with pytest.raises(ValueError, match=rf"labels hold {vocab} \(row 0, position 4\), outside the vocabulary"):
        module.on_before_batch_transfer(batch, 0)

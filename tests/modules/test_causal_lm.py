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

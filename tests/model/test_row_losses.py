"""Phi3ForCausalLM.row_losses (per-row loss without (B, T, V) logits) against cross-entropy on the full logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from phi3_lightning import Phi3ForCausalLM, get_preset


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 8:] = 0  # right padding
    labels = ids.clone()
    labels[1, :5] = -100  # a prompt: no loss
    labels[2] = -100  # nothing to predict
    return ids, mask, labels


def _reference(logits, labels, mask):
    """Row i: mean CE over targets labels[t + 1] that are not -100 and whose query t is not padding."""
    out = []
    for i in range(labels.shape[0]):
        targets = labels[i, 1:].clone()
        targets[mask[i, :-1] == 0] = -100
        keep = targets != -100
        ce = F.cross_entropy(logits[i, :-1][keep].double(), targets[keep]) if keep.any() else torch.tensor(math.nan)
        out.append((float(ce), int(keep.sum())))
    return out


def test_row_losses_equal_cross_entropy_per_row_and_average_to_the_batch_loss():
    torch.manual_seed(0)
    model = Phi3ForCausalLM(get_preset("tiny")).eval()
    ids, mask, labels = _batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        losses, counts = model.row_losses(out.hidden_states, labels, mask)
    ref = _reference(out.logits, labels, mask)
    assert counts.tolist() == [n for _, n in ref] == [11, 7, 0, 8]
    for got, (want, n) in zip(losses.tolist(), ref):
        assert math.isnan(got) if n == 0 else abs(got - want) < 1e-5
    weighted = sum(loss * n for loss, n in zip(losses.tolist(), counts.tolist()) if n) / counts.sum()
    assert abs(float(weighted) - float(out.loss)) < 1e-5

"""Causal language modelling (next-token prediction), pretraining-style packed text or chat fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.heads import ignore_targets_after_padding
from ..model.loss import IGNORE_INDEX, check_causal_lm_labels, shift_labels
from .base import LossMean, Phi3LightningModule


class PerplexityFromLoss(LossMean):
    """exp(token-weighted mean loss): update with (mean loss of a batch, its number of target tokens)."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


def _stage_metrics() -> nn.ModuleDict:
    return nn.ModuleDict({"loss": LossMean(), "perplexity": PerplexityFromLoss()})


class CausalLMModule(Phi3LightningModule):
    """Phi-3 causal LM: loss and perplexity (token-weighted) under ``train/``, ``val/``, ``test/``.

    Training uses the model's fused chunked linear + cross-entropy (no (B, T, vocab) logits are materialised).
    ``predict`` writes each row's loss, perplexity and number of predicted tokens.
    """

    task = "causal_lm"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._register_metrics(_stage_metrics)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Labels outside the vocabulary are refused here, while the batch is still on the host: on a GPU the check
        costs no device sync and the run never reaches cross-entropy's device-side assert. (The base class then
        drops the distributed sampler's repeats from a val / test batch.)"""
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu":
            check_causal_lm_labels(labels, self.config.vocab_size)
        return super().on_before_batch_transfer(batch, dataloader_idx)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch, return_logits=False)
        labels = batch["labels"]
        if batch.get("attention_mask") is not None:  # the head's rule: a padding position predicts nothing
            labels = ignore_targets_after_padding(labels, batch["attention_mask"])
        n_targets = (shift_labels(labels) != IGNORE_INDEX).sum()  # the tokens out.loss is the mean over
        metrics = self.stage_metrics(stage)
        loss = out.loss.detach().float()
        self._update(metrics["loss"], stage, loss, n_targets)
        self._update(metrics["perplexity"], stage, loss, n_targets)
        self._log_metrics(stage, dict(metrics.items()), batch_size=batch["input_ids"].shape[0])
        return self._training_objective(stage, out.loss, n_targets)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        out = self(batch, return_logits=False)
        losses, counts = self.head.row_losses(out.hidden_states, batch["labels"], batch.get("attention_mask"))
        index = batch.get("index", torch.arange(losses.shape[0]))
        return {"index": index.tolist(), "loss": losses.tolist(), "tokens": counts.tolist()}

    def prediction_rows(self, outputs: dict, datamodule: Any) -> list[dict[str, Any]]:
        rows = []
        for i, loss, n in zip(outputs["index"], outputs["loss"], outputs["tokens"]):
            ppl = float(torch.tensor(loss).exp()) if n else None
            rows.append({"index": i, "tokens": n, "loss": loss if n else None, "perplexity": ppl})
        return rows

"""Token classification: one class per token (labels -100 are ignored: padding, non-first sub-tokens)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ..model.loss import IGNORE_INDEX
from .base import LossMean, Phi3LightningModule
from .sequence_classification import label_overrides


class TokenClassificationModule(Phi3LightningModule):
    """Phi-3 token classifier. Metrics: loss, token accuracy and macro-F1 over labelled tokens.

    ``num_labels`` and ``label_names`` are linked from the data module by the CLI. ``predict`` writes every word's
    predicted label name (via the data module) or every token's.

    Args:
        num_labels: classes of the score layer; default: label_names' length, else the checkpoint's / preset's.
        label_names: class names in class-id order (stored as the config's id2label, used in predictions).
    """

    _hparams_ignore = ("label_names", "problem_type")
    task = "token_classification"

    def __init__(self, num_labels: int | None = None, label_names: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(_head_overrides=label_overrides(num_labels, label_names), **kwargs)
        n = self.config.num_labels
        self._register_metrics(
            lambda: nn.ModuleDict(
                {
                    "loss": LossMean(),
                    "accuracy": MulticlassAccuracy(num_classes=n, average="micro", ignore_index=IGNORE_INDEX),
                    "f1": MulticlassF1Score(num_classes=n, average="macro", ignore_index=IGNORE_INDEX),
                }
            )
        )

    @property
    def label_names(self) -> list[str]:
        id2label = self.config.id2label or {}
        return [str(id2label.get(str(i), i)) for i in range(self.config.num_labels)]

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch)
        labels = batch["labels"]
        preds = out.logits.detach().argmax(-1)
        metrics = self.stage_metrics(stage)
        counted = (labels != IGNORE_INDEX).sum()
        self._update(metrics["loss"], stage, out.loss.detach().float(), counted)
        self._update(metrics["accuracy"], stage, preds.flatten(), labels.flatten())
        self._update(metrics["f1"], stage, preds.flatten(), labels.flatten())
        self._log_metrics(stage, dict(metrics.items()), batch_size=labels.shape[0])
        return self._training_objective(stage, out.loss, counted)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        preds = self(inputs).logits.argmax(-1)
        index = batch.get("index", torch.arange(preds.shape[0], device=preds.device))
        mask = batch.get("attention_mask", torch.ones_like(preds))
        return {"index": index.cpu(), "predictions": preds.cpu(), "attention_mask": mask.cpu()}

    def prediction_rows(self, outputs: dict, datamodule: Any) -> list[dict[str, Any]]:
        if hasattr(datamodule, "decode_predictions"):
            return datamodule.decode_predictions(outputs["index"], outputs["predictions"])
        names = self.label_names
        rows = []
        for i, p, m in zip(outputs["index"].tolist(), outputs["predictions"], outputs["attention_mask"]):
            rows.append({"index": i, "predictions": [names[int(c)] for c in p[m.bool()].tolist()]})
        return rows

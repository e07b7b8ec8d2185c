"""Sequence classification / regression on the pooled last token (or attention pooling)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanSquaredError
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from ..conventions import PROBLEM_TYPES
from ..model.loss import IGNORE_INDEX, infer_problem_type
from .base import LossMean, Phi3LightningModule


def label_overrides(num_labels: int | None, label_names: list[str] | None) -> dict[str, Any]:
    """Config fields (num_labels, id2label) from the linked data facts; checks they agree."""
    out: dict[str, Any] = {}
    if label_names is not None:
        if num_labels is not None and num_labels != len(label_names):
            raise ValueError(
                f"num_labels={num_labels} but {len(label_names)} label_names {label_names}; give one name per class"
            )
        num_labels = len(label_names)
        out["id2label"] = {str(i): str(n) for i, n in enumerate(label_names)}
    if num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels={num_labels} must be >= 1")
        out["num_labels"] = num_labels
    return out


class SequenceClassificationModule(Phi3LightningModule):
    """Phi-3 sequence classifier. Metrics: loss, accuracy and macro-F1 (single- and multi-label), MSE (regression).

    ``num_labels``, ``label_names`` and ``problem_type`` are linked from the data module by the CLI; in Python
    pass them yourself (or let a checkpoint's config.json supply them). ``predict`` writes the predicted label
    name and the class probabilities of every example.

    Args:
        num_labels: classes of the score layer (1 for regression); default: label_names' length, else the
            checkpoint's / preset's config.
        label_names: class names in class-id order (stored as the config's id2label, used in predictions).
        problem_type: ``single_label_classification``, ``multi_label_classification`` or ``regression``; null:
            regression if num_labels == 1, else single-label.
        pooling: ``last`` (the rightmost non-pad token, as transformers) or ``attention`` (learned softmax pooling).
    """

    _hparams_ignore = ("label_names", "problem_type")
    task = "sequence_classification"

    def __init__(
        self,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        problem_type: str | None = None,
        pooling: str = "last",
        **kwargs: Any,
    ) -> None:
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={problem_type!r}; use one of {', '.join(PROBLEM_TYPES)} or null")
        if pooling not in ("last", "attention"):
            raise ValueError(f"pooling={pooling!r}; use 'last' or 'attention'")
        overrides = label_overrides(num_labels, label_names)
        if problem_type is not None:
            overrides["problem_type"] = problem_type
        super().__init__(_head_overrides=overrides, **kwargs)
        self.pooling = pooling
        n = self.config.num_labels
        self.problem_type = self.config.problem_type or ("regression" if n == 1 else "single_label_classification")
        if n == 1 and self.problem_type == "single_label_classification":
            raise ValueError(
                "num_labels=1 with problem_type='single_label_classification': a softmax over one class is always "
                "1 (loss 0, nothing to learn); use num_labels=2 for two classes, multi_label_classification for "
                "one yes/no output (sigmoid + BCE), or regression (labels read from data that hold one class give this: "
                "list every class in --data.init_args.label_names)"
            )
        self._register_metrics(self._make_metrics)

    def _head_kwargs(self) -> dict[str, Any]:
        return {"pooling": self.pooling}

    @property
    def label_names(self) -> list[str]:
        n = self.config.num_labels
        id2label = self.config.id2label or {}
        return [str(id2label.get(str(i), i)) for i in range(n)]

    def _make_metrics(self) -> nn.ModuleDict:
        """Single-label: accuracy and macro-F1 over the labelled examples (-100 skipped; a class neither present nor
        predicted is left out of the average). Multi-label: the share of correct (example, label) decisions and the
        macro-F1 over labels (a label never a target nor predicted scores 0 and counts in the average), a label
        deciding positive when its sigmoid is above 0.5 and a target counting as positive when above 0.5 (soft
        targets: the loss uses them as given, the metrics thresholded); one output: binary accuracy and F1.
        Regression: MSE over every output."""
        n = self.config.num_labels
        m: dict[str, nn.Module] = {"loss": LossMean()}
        if self.problem_type == "regression":
            m["mse"] = MeanSquaredError()
        elif self.problem_type == "multi_label_classification" and n == 1:  # torchmetrics' multi-label needs 2+
            m["accuracy"] = BinaryAccuracy()
            m["f1"] = BinaryF1Score()
        elif self.problem_type == "multi_label_classification":
            m["accuracy"] = MultilabelAccuracy(num_labels=n)
            m["f1"] = MultilabelF1Score(num_labels=n, average="macro")
        else:
            m["accuracy"] = MulticlassAccuracy(num_classes=n, average="micro", ignore_index=IGNORE_INDEX)
            m["f1"] = MulticlassF1Score(num_classes=n, average="macro", ignore_index=IGNORE_INDEX)
        return nn.ModuleDict(m)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self._trainer.datamodule if self._trainer is not None else None
        pad = getattr(dm, "pad_token_id", None)
        if self.head is None and pad is not None and pad != self.config.pad_token_id and pad < self.config.vocab_size:
            # "last" pooling finds the last token that is not the pad id: it must be the tokenizer's pad id.
            self.config = self.config.replace(pad_token_id=pad)

    def _targets_and_preds(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.detach().float()
        if self.problem_type == "regression":
            return logits.reshape(labels.shape), labels.float()
        if self.problem_type == "multi_label_classification":
            # probabilities, never logits: torchmetrics applies the sigmoid only when some value lies outside [0, 1],
            # so a batch whose logits all lay in [0, 1] was thresholded as if they were probabilities
            # a target is positive when above 0.5, as a prediction is: soft targets (label smoothing, distillation)
            # go to the loss as they are; truncating them (.long()) made 0.9 a negative
            probs, targets = logits.sigmoid(), (labels > 0.5).long()
            return (probs.flatten(), targets.flatten()) if self.config.num_labels == 1 else (probs, targets)
        return logits.argmax(-1), labels

    def _resolve_problem_type(self, labels: torch.Tensor) -> None:
        """No problem_type configured: the loss infers it from the labels (float multi-hot -> multi-label BCE), so
        take the same one, by the same rule, for the metrics and predictions, and keep it in the config."""
        if self.config.problem_type is not None:
            return
        found = infer_problem_type(self.config.num_labels, labels)
        self.config.problem_type = found
        if self.head is not None:
            self.head.config.problem_type = found
        if found != self.problem_type:
            self.problem_type = found
            self._register_metrics(self._make_metrics)  # nothing accumulated yet: the first labelled batch
            for stage in ("train", "val", "test"):
                self.stage_metrics(stage).to(self.device)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        labels = batch["labels"]
        self._resolve_problem_type(labels)
        out = self(batch)
        preds, targets = self._targets_and_preds(out.logits, labels)
        metrics = self.stage_metrics(stage)
        b = labels.shape[0]
        units = self._loss_units(labels)  # the loss is the mean over these (rows labelled -100 are not counted)
        self._update(metrics["loss"], stage, out.loss.detach().float(), units)
        for name, metric in metrics.items():
            if name != "loss":
                self._update(metric, stage, preds, targets)
        self._log_metrics(stage, dict(metrics.items()), batch_size=b)
        return self._training_objective(stage, out.loss, units)

    def _loss_units(self, labels: torch.Tensor) -> torch.Tensor:
        """What the loss is the mean over, per example: single-label cross-entropy over the examples whose label is
        not -100; multi-label BCE and regression MSE over every example (each the mean of its num_labels outputs)."""
        if self.problem_type == "single_label_classification":
            return (labels != IGNORE_INDEX).sum()
        return torch.tensor(labels.shape[0], device=labels.device)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        logits = self(batch).logits.float()
        if self.problem_type == "regression":
            preds, scores = logits.squeeze(-1), None
        elif self.problem_type == "multi_label_classification":
            scores = logits.sigmoid()
            preds = (scores > 0.5).long()
        else:
            scores = logits.softmax(-1)
            preds = scores.argmax(-1)
        index = batch.get("index", torch.arange(logits.shape[0], device=logits.device))
        return {"index": index.cpu(), "predictions": preds.cpu(), "scores": None if scores is None else scores.cpu()}

    def prediction_rows(self, outputs: dict, datamodule: Any) -> list[dict[str, Any]]:
        names = self.label_names
        index, preds, scores = outputs["index"], outputs["predictions"], outputs["scores"]
        if hasattr(datamodule, "decode_predictions"):
            rows = datamodule.decode_predictions(index, preds)
        else:
            rows = []
            for i, p in zip(index.tolist(), preds.tolist()):
                if self.problem_type == "single_label_classification":
                    named: Any = names[int(p)]
                elif self.problem_type == "multi_label_classification":
                    named = [n for n, d in zip(names, p) if d]
                else:
                    named = float(p)
                rows.append({"index": i, "prediction": named})
        if scores is not None:
            for row, s in zip(rows, scores.tolist()):
                row["scores"] = {n: round(float(v), 6) for n, v in zip(names, s)}
        return rows

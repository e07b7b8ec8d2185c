"""The classification metrics a run logs, recomputed by hand: each example run alone through the head, then accuracy,
macro-F1 and MSE written out here from their definitions (sklearn's conventions: a class that is neither a target
nor a prediction is left out of the multiclass macro average; a label without positives and without predicted
positives scores 0 in the multi-label macro average), compared with what ``validate`` reports."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from phi3_lightning.modules import SequenceClassificationModule, TokenClassificationModule

from .helpers import built, quiet_trainer


def _rows(n: int, labels: list, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        rows.append({"input_ids": torch.randint(3, 200, (length,), generator=g), "labels": labels[i]})
    return rows


def _collate(batch: list[dict], pad: int = 257, per_token: bool = False) -> dict:
    """Right padding with the tiny preset's pad id (``last`` pooling finds the rightmost token that is not it)."""
    t = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), t), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), t, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    labels = [torch.as_tensor(r["labels"]) for r in batch]
    if not per_token:  # (B,) class ids or targets, (B, num_labels) multi-hot
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack(labels)}
    out = torch.full((len(batch), t), -100)
    for i, lab in enumerate(labels):
        out[i, : len(lab)] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": out}


def _single_logits(module, rows) -> torch.Tensor:
    """(N, num_labels) logits, one example at a time (no padding)."""
    with torch.no_grad():
        return torch.cat([module.head(input_ids=r["input_ids"][None]).logits.double() for r in rows])


def _macro_f1_multiclass(preds: list[int], targets: list[int], n: int) -> float:
    scores = []
    for c in range(n):
        tp = sum(p == c and t == c for p, t in zip(preds, targets))
        fp = sum(p == c and t != c for p, t in zip(preds, targets))
        fn = sum(p != c and t == c for p, t in zip(preds, targets))
        if tp + fp + fn:  # a class neither predicted nor present is left out (sklearn: labels of y_true | y_pred)
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def _validate(module, rows, batch_size: int) -> dict:
    assert module.config.pad_token_id == 257
    per_token = isinstance(module, TokenClassificationModule)
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=functools.partial(_collate, per_token=per_token))
    return quiet_trainer().validate(module, dataloaders=loader, verbose=False)[0]


def test_single_label_metrics_skip_ignored_rows_and_the_loss_counts_only_labelled_examples():
    """Rows labelled -100 carry no target (the loss ignores them, as transformers): accuracy and macro-F1 must skip
    them too (the metrics crashed: 'Detected more unique values in `target` than expected ... -100'), and the
    epoch loss is the mean over the labelled examples, not weighted by rows (a batch of 4 rows with one label
    weighed as much as one with four). Imbalanced classes, class 3 of 4 never a target."""
    torch.manual_seed(0)
    labels = [0, -100, 0, 0, 2, 0, -100, -100, 1, 0, 0, -100, 2]
    rows = _rows(len(labels), labels)
    module = built(SequenceClassificationModule(model="tiny", num_labels=4))
    module.eval()
    logits = _single_logits(module, rows)
    keep = [i for i, y in enumerate(labels) if y != -100]
    targets = torch.tensor([labels[i] for i in keep])
    expected_loss = F.cross_entropy(logits[keep], targets).item()
    preds = logits[keep].argmax(-1).tolist()
    expected_acc = sum(p == t for p, t in zip(preds, targets.tolist())) / len(keep)
    expected_f1 = _macro_f1_multiclass(preds, targets.tolist(), 4)
    result = _validate(module, rows, batch_size=4)
    assert math.isclose(result["val/loss"], expected_loss, rel_tol=1e-5), (result, expected_loss)
    assert math.isclose(result["val/accuracy"], expected_acc, rel_tol=1e-6), (result, expected_acc)
    assert math.isclose(result["val/f1"], expected_f1, rel_tol=1e-6), (result, expected_f1)


def test_single_label_metrics_of_two_classes_equal_the_hand_computation():
    torch.manual_seed(1)
    labels = [1, 0, 0, 0, 0, 1, 0, 0, 0]
    rows = _rows(len(labels), labels, seed=3)
    module = built(SequenceClassificationModule(model="tiny", num_labels=2))
    module.eval()
    logits = _single_logits(module, rows)
    preds = logits.argmax(-1).tolist()
    result = _validate(module, rows, batch_size=4)
    assert math.isclose(result["val/loss"], F.cross_entropy(logits, torch.tensor(labels)).item(), rel_tol=1e-5)
    assert math.isclose(result["val/accuracy"], sum(p == t for p, t in zip(preds, labels)) / len(labels), rel_tol=1e-6)
    assert math.isclose(result["val/f1"], _macro_f1_multiclass(preds, labels, 2), rel_tol=1e-6)


def _constant_score(module, logits: list[float]) -> None:
    """Replace the score layer by one that gives the same logits for every example."""
    score = torch.nn.Linear(module.config.hidden_size, len(logits), bias=True)
    with torch.no_grad():
        score.weight.zero_()
        score.bias.copy_(torch.tensor(logits))
    module.head.score = score


def test_multi_label_metrics_threshold_the_probability_even_when_every_logit_lies_in_0_1():
    """torchmetrics takes float predictions inside [0, 1] for probabilities and only others for logits: logits that
    all happened to lie in [0, 1] (a small model, a small batch) were thresholded at 0.5 as if they were
    probabilities, so a logit of 0.2 (probability 0.55: predicted positive, as ``predict`` says) counted as a
    negative: accuracy 0.33 instead of 1."""
    module = built(SequenceClassificationModule(model="tiny", num_labels=3, problem_type="multi_label_classification"))
    module.eval()
    _constant_score(module, [0.2, 0.7, 0.4])  # all three positive: sigmoid > 0.5
    rows = _rows(4, [torch.ones(3)] * 4)
    result = _validate(module, rows, batch_size=4)
    assert result["val/accuracy"] == 1.0 and result["val/f1"] == 1.0, result
    out = module.predict_step(_collate(rows), 0)
    assert out["predictions"].eq(1).all()


def test_multi_label_metrics_equal_the_hand_computation():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(5)
    hot = (torch.rand(11, 3, generator=g) < 0.4).float()
    hot[:, 2] = 0.0  # label 2 never a target
    rows = _rows(11, list(hot))
    module = built(SequenceClassificationModule(model="tiny", num_labels=3, problem_type="multi_label_classification"))
    module.eval()
    logits = _single_logits(module, rows)
    preds = (logits.sigmoid() > 0.5).double()
    expected_acc = (preds == hot).double().mean().item()
    f1 = []
    for j in range(3):
        tp = float((preds[:, j] * hot[:, j]).sum())
        fp = float((preds[:, j] * (1 - hot[:, j])).sum())
        fn = float(((1 - preds[:, j]) * hot[:, j]).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    result = _validate(module, rows, batch_size=4)
    expected_loss = F.binary_cross_entropy_with_logits(logits, hot.double()).item()
    assert math.isclose(result["val/loss"], expected_loss, rel_tol=1e-5), (result, expected_loss)
    assert math.isclose(result["val/accuracy"], expected_acc, rel_tol=1e-6), (result, expected_acc)
    assert math.isclose(result["val/f1"], sum(f1) / 3, rel_tol=1e-6), (result, f1)


def _multi_label_hand(logits: torch.Tensor, hard: torch.Tensor) -> tuple[float, float]:
    """Accuracy over (example, label) decisions and macro-F1 over labels (a label with no target and no predicted
    positive scores 0: sklearn's ``f1_score(average="macro", zero_division=0)``), predictions: sigmoid above 0.5."""
    preds = (logits.sigmoid() > 0.5).double()
    f1 = []
    for j in range(hard.shape[1]):
        tp = float((preds[:, j] * hard[:, j]).sum())
        fp = float((preds[:, j] * (1 - hard[:, j])).sum())
        fn = float(((1 - preds[:, j]) * hard[:, j]).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return (preds == hard).double().mean().item(), sum(f1) / len(f1)


@pytest.mark.parametrize("num_labels", [1, 3])
def test_multi_label_soft_targets_are_thresholded_at_0_5_for_the_metrics(num_labels):
    """Soft targets (label smoothing, distillation): the loss uses them as they are; accuracy and F1 count a target
    as positive when it is above 0.5, the rule the predictions follow. They were truncated (``.long()``): 0.9 and
    0.7 counted as negatives, so a model predicting them positive scored accuracy 0."""
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(8)
    soft = torch.rand(13, num_labels, generator=g)
    soft[0, 0], soft[1, 0], soft[2, 0] = 0.5, 0.5000001, 0.9999  # the boundary: 0.5 itself is negative
    rows = _rows(13, list(soft), seed=4)
    module = built(
        SequenceClassificationModule(model="tiny", num_labels=num_labels, problem_type="multi_label_classification")
    )
    module.eval()
    logits = _single_logits(module, rows)
    hard = (soft > 0.5).double()
    assert 0 < hard.mean() < 1
    expected_acc, expected_f1 = _multi_label_hand(logits, hard)
    result = _validate(module, rows, batch_size=4)
    expected_loss = F.binary_cross_entropy_with_logits(logits, soft.double()).item()  # the soft targets themselves
    assert math.isclose(result["val/loss"], expected_loss, rel_tol=1e-5), (result, expected_loss)
    assert math.isclose(result["val/accuracy"], expected_acc, rel_tol=1e-6), (result, expected_acc)
    assert math.isclose(result["val/f1"], expected_f1, rel_tol=1e-6), (result, expected_f1)
    # a model predicting every label positive on targets 0.9 / 0.7: all correct (truncated, all wrong)
    _constant_score(module, [3.0] * num_labels)
    result = _validate(module, _rows(4, [torch.tensor([0.9, 0.7, 0.6][:num_labels])] * 4), batch_size=2)
    assert result["val/accuracy"] == 1.0 and result["val/f1"] == 1.0, result


def test_one_output_multi_label_is_a_binary_classifier_and_one_class_single_label_is_refused():
    """num_labels=1 with BCE (multi_label_classification: one yes/no output) is a valid classifier; its metrics
    (torchmetrics' multi-label classes refuse one label) are binary accuracy and F1 of the positive class. A
    single-label classifier with one class has a constant loss of 0: refused naming the fix."""
    torch.manual_seed(3)
    target = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [0.0], [1.0]])
    rows = _rows(7, list(target), seed=7)
    module = built(SequenceClassificationModule(model="tiny", num_labels=1, problem_type="multi_label_classification"))
    module.eval()
    logits = _single_logits(module, rows)
    preds = (logits.sigmoid() > 0.5).double()
    tp = float((preds * target).sum())
    fp = float((preds * (1 - target)).sum())
    fn = float(((1 - preds) * target).sum())
    result = _validate(module, rows, batch_size=3)
    assert math.isclose(result["val/accuracy"], (preds == target).double().mean().item(), rel_tol=1e-6)
    assert math.isclose(result["val/f1"], 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, rel_tol=1e-6)
    assert math.isclose(
        result["val/loss"], F.binary_cross_entropy_with_logits(logits, target.double()).item(), rel_tol=1e-5
    )
    with pytest.raises(ValueError, match=r"num_labels=1 .*single_label_classification.*num_labels=2"):
        SequenceClassificationModule(model="tiny", num_labels=1, problem_type="single_label_classification")


def test_regression_mse_is_the_mean_squared_error_over_every_example():
    torch.manual_seed(4)
    target = [0.5, -1.0, 2.0, 0.25, 3.0, -0.5, 1.5]
    rows = _rows(len(target), [torch.tensor(t) for t in target], seed=9)
    module = built(SequenceClassificationModule(model="tiny", num_labels=1))
    module.eval()
    logits = _single_logits(module, rows)[:, 0]
    expected = ((logits - torch.tensor(target, dtype=torch.float64)) ** 2).mean().item()
    result = _validate(module, rows, batch_size=3)
    assert math.isclose(result["val/mse"], expected, rel_tol=1e-5), (result, expected)
    assert math.isclose(result["val/loss"], expected, rel_tol=1e-5), (result, expected)


def test_token_metrics_count_labelled_tokens_only():
    """Token accuracy and macro-F1 over the tokens whose label is not -100 (padding, non-first sub-tokens), every
    labelled token weighing the same across batches; classes 3 and 4 are never targets."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(1)
    labels = []
    for _ in range(7):
        length = int(torch.randint(3, 9, (1,), generator=g))
        lab = torch.randint(0, 3, (length,), generator=g)
        lab[torch.rand(length, generator=g) < 0.3] = -100
        labels.append(lab)
    rows = _rows(7, labels, seed=11)
    for r in rows:  # one label per token
        r["labels"] = r["labels"][: len(r["input_ids"])]
        r["input_ids"] = r["input_ids"][: len(r["labels"])]
    module = built(TokenClassificationModule(model="tiny", num_labels=5))
    module.eval()
    preds, targets, total = [], [], 0.0
    with torch.no_grad():
        for r in rows:
            lg = module.head(input_ids=r["input_ids"][None]).logits[0].double()
            keep = r["labels"] != -100
            total += F.cross_entropy(lg[keep], r["labels"][keep], reduction="sum").item()
            preds += lg[keep].argmax(-1).tolist()
            targets += r["labels"][keep].tolist()
    result = _validate(module, rows, batch_size=3)
    assert math.isclose(result["val/loss"], total / len(targets), rel_tol=1e-5)
    assert math.isclose(
        result["val/accuracy"], sum(p == t for p, t in zip(preds, targets)) / len(targets), rel_tol=1e-6
    )
    assert math.isclose(result["val/f1"], _macro_f1_multiclass(preds, targets, 5), rel_tol=1e-6)


def _never_predict(module, label: int) -> None:
    """Keep the score layer's weights, add a bias that rules ``label`` out of every prediction."""
    old = module.head.score
    score = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        score.weight.copy_(old.weight)
        score.bias.copy_(old.bias if old.bias is not None else torch.zeros(old.out_features))
        score.bias[label] = -1e4
    module.head.score = score


def test_macro_f1_of_a_class_absent_from_targets_and_predictions_in_the_epoch():
    """What the README says, against sklearn's rules written out: single-label (and token) macro-F1 averages over the
    classes that are a target or a prediction somewhere in the epoch (sklearn: the labels of y_true | y_pred), so a
    class absent from both is left out rather than scored 0 (or 1); multi-label macro-F1 averages over every label,
    one with no target and no predicted positive scoring 0 (sklearn's ``zero_division=0``). Class 2 occurs only in the
    first batch: the average is over the epoch's counts, not a mean of per-batch averages."""
    torch.manual_seed(7)
    labels = [2, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1]  # class 3 never a target, class 2 only in batch 0
    rows = _rows(len(labels), labels, seed=12)
    module = built(SequenceClassificationModule(model="tiny", num_labels=4))
    module.eval()
    _never_predict(module, 3)
    logits = _single_logits(module, rows)
    preds = logits.argmax(-1).tolist()
    assert 3 not in preds and 3 not in labels and len(set(preds) | set(labels)) == 3
    present = _macro_f1_multiclass(preds, labels, 4)
    scored_0 = present * 3 / 4  # the absent class scoring 0 and counted
    assert present != scored_0
    result = _validate(module, rows, batch_size=4)
    assert math.isclose(result["val/f1"], present, rel_tol=1e-6), (result, present, scored_0)

    # token classification: the same rule over labelled tokens
    g = torch.Generator().manual_seed(3)
    token_rows = []
    for i in range(6):
        lab = torch.randint(0, 2, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g)
        lab[0] = 2 if i == 0 else lab[0]
        token_rows.append({"input_ids": torch.randint(3, 200, (len(lab),), generator=g), "labels": lab})
    tok = built(TokenClassificationModule(model="tiny", num_labels=4))
    tok.eval()
    _never_predict(tok, 3)
    with torch.no_grad():
        tp = [tok.head(input_ids=r["input_ids"][None]).logits[0].argmax(-1) for r in token_rows]
    t_preds = torch.cat(tp).tolist()
    t_targets = torch.cat([r["labels"] for r in token_rows]).tolist()
    assert 3 not in t_preds and 3 not in t_targets
    result = _validate(tok, token_rows, batch_size=2)
    assert math.isclose(result["val/f1"], _macro_f1_multiclass(t_preds, t_targets, 4), rel_tol=1e-6)

    # multi-label: label 3 never a target and never predicted scores 0 and counts in the mean over 4 labels
    g = torch.Generator().manual_seed(9)
    hot = (torch.rand(9, 4, generator=g) < 0.5).float()
    hot[:, 3] = 0.0
    rows = _rows(9, list(hot), seed=13)
    ml = built(SequenceClassificationModule(model="tiny", num_labels=4, problem_type="multi_label_classification"))
    ml.eval()
    _never_predict(ml, 3)
    logits = _single_logits(ml, rows)
    assert not (logits[:, 3].sigmoid() > 0.5).any()
    _, expected_f1 = _multi_label_hand(logits, hot.double())
    result = _validate(ml, rows, batch_size=4)
    assert math.isclose(result["val/f1"], expected_f1, rel_tol=1e-6), (result, expected_f1)
    assert expected_f1 <= 0.75  # one of the four labels scores 0

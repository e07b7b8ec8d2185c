"""Sequence-classification / regression DataModule: a text and a label (labels, float target) per record."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset

from ..embedded import DEFAULT_PACKAGES, available_packages
from ..sources import Record, iter_field
from ..warn import warn_data
from .base import ExampleDataset, _BaseDataModule
from .labels import PROBLEM_TYPES, _is_number, _LabelMixin, _natural_sorted, _numeric, infer_class_names


class SequenceClassificationDataModule(_LabelMixin, _BaseDataModule):
    """Sequence classification / regression: a text and a label (or several labels, or a float target) per record.

    * single-label: the label is a class name (or index) -> ``labels`` (B,) long;
    * multi-label: the label is a list of class names (or a 0/1 vector), or ``label_field`` names several 0/1
      columns separated by commas (``"toxic,obscene,insult"``) -> ``labels`` (B, num_labels) float;
    * regression: the label is a number -> ``labels`` (B,) float, ``num_labels = 1``.

    The embedded default: which top-level stdlib package a code snippet comes from (``packages`` present here).

    Args:
        tokenizer: ``"byte"`` or a checkpoint directory holding ``tokenizer.json``.
        source: ``"embedded"``, a data file, a directory with ``train.*``/``val.*``/``test.*``, a ``datasets``
            ``save_to_disk`` directory, or ``hf:NAME[:CONFIG]``; from Python also a ``datasets`` object
            (see ``CausalLMDataModule``).
        train_file: a training file (jsonl / json / csv / tsv / parquet); overrides the source's train split.
        val_file: a validation file; default: ``val_fraction`` of train.
        test_file: a test file (also the predict split); default: ``test_fraction`` of train, else the val split.
        text_field: field holding the text.
        label_field: field holding the label; several comma-separated 0/1 fields make a multi-label problem.
        label_names: the classes, in class-id order; default: read from the training split (sorted).
        problem_type: ``single_label_classification``, ``multi_label_classification`` or ``regression``; default:
            inferred from the labels (lists -> multi-label, non-integer numbers -> regression).
        max_length: maximum tokens per example.
        truncate: cut examples longer than ``max_length`` (true) or raise an error (false).
        add_bos: prepend the tokenizer's bos id (an error if the tokenizer has none).
        add_eos: append the tokenizer's eos id (the head pools the last non-pad token); a no-op, warned, when the
            tokenizer pads with its eos id (Phi-3, Phi-4-mini): the pooling takes that eos for padding.
        batch_size: training batch size.
        eval_batch_size: validation / test / predict batch size; default ``batch_size``.
        num_workers: dataloader worker processes.
        padding_side: ``"right"`` or ``"left"``.
        pad_to_multiple_of: round padded lengths up to a multiple of this.
        group_by_length: batch examples of similar length together.
        val_fraction: fraction of train carved out as val when no val split is given.
        test_fraction: fraction of train carved out as test when no test split is given (0: test = val).
        max_documents: read at most this many records per split (all sources); required with ``streaming``.
        streaming: open an ``hf:NAME[:CONFIG]`` source as a stream (``load_dataset(..., streaming=True)``) and read
            only the first ``max_documents`` records of each split, in stream order, instead of downloading and
            preparing the whole dataset; needs ``max_documents``, and applies to ``hf:`` sources only. Resuming
            exactly needs the same first records again: pin the revision or use local data.
        packages: embedded data: the stdlib packages that are the classes (those present are used).
        snippet_lines: embedded data: lines per snippet.
        max_per_class: embedded data: snippets per package.
        cache_dir: embedded cache directory; default ``$PHI3_LIGHTNING_CACHE`` or ``~/.cache/phi3_lightning``.
        seed: seed of the split hash, the shuffle and the batch order.
        progress: show a progress bar while building the embedded data.
    """

    _embedded_kind = "code_cls"
    task = "sequence_classification"

    def __init__(
        self,
        tokenizer: str = "byte",
        source: str | Any = "embedded",
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        label_names: list[str] | None = None,
        problem_type: str | None = None,
        max_length: int = 256,
        truncate: bool = True,
        add_bos: bool = False,
        add_eos: bool = False,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_documents: int | None = None,
        streaming: bool = False,
        packages: list[str] = list(DEFAULT_PACKAGES),  # noqa: B006 - shown by --help; copied in __init__
        snippet_lines: int = 8,
        max_per_class: int | None = 200,
        cache_dir: str | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            source=source,
            train_file=train_file,
            val_file=val_file,
            test_file=test_file,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            max_length=max_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            group_by_length=group_by_length,
            max_documents=max_documents,
            streaming=streaming,
            cache_dir=cache_dir,
            seed=seed,
            progress=progress,
            text_field=text_field,
        )
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={problem_type!r}; use one of {PROBLEM_TYPES} or None (inferred)")
        self.label_field = label_field
        self.label_fields = [f.strip() for f in label_field.split(",") if f.strip()]
        if not self.label_fields:
            raise ValueError(f"label_field={label_field!r}; name the field holding the label")
        self._check_add_bos(add_bos)
        tok = self.tokenizer
        if add_eos and tok.pad_token_id == tok.eos_token_id:
            # Both poolings take a pad-id token for padding: "last" pools the rightmost token that is not the pad id
            # (as transformers), "attention" masks pad ids; and no earlier token attends to it (causal). The eos
            # changes no logit. Warned, not refused: the results are those of add_eos=False, and runs made with it
            # (checkpoints record add_eos) must still resume.
            warn_data(
                f"add_eos=True but the tokenizer's pad id is its eos id ({tok.eos_token_id}; Phi-3 and Phi-4-mini "
                "pad with their eos), so the pooling takes the appended eos for padding and skips it: add_eos "
                "changes nothing here (the head pools the last token of the text, as with add_eos=False); set "
                "add_eos=False (--data.add_eos false) to say so, or use a tokenizer whose pad token "
                "differs from its eos token to pool on an end token"
            )
        self.truncate = truncate
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.packages = list(packages)
        self.snippet_lines = snippet_lines
        self.max_per_class = max_per_class
        self._label_names = list(label_names) if label_names is not None else None
        self._problem_type = problem_type
        if len(self.label_fields) > 1:  # several 0/1 columns
            if problem_type not in (None, "multi_label_classification"):
                raise ValueError(
                    f"label_field={label_field!r} names several columns, which is a multi-label problem, but "
                    f"problem_type={problem_type!r}; drop problem_type or use one label field"
                )
            self._problem_type = "multi_label_classification"
            self._label_names = self._label_names or list(self.label_fields)
        if self.is_embedded:
            self._problem_type = self._problem_type or "single_label_classification"
            if self._label_names is None:
                self._label_names = available_packages(self.packages)
                if not self._label_names:
                    raise ValueError(
                        f"none of packages={self.packages} is in this Python's standard library; pick packages "
                        "that exist (e.g. email, json, asyncio)"
                    )
        if self._problem_type == "regression" and self._label_names is None:
            self._label_names = [label_field]
        self._save_hyperparameters()

    def _embedded_params(self) -> dict[str, Any]:
        return {"packages": self.packages, "snippet_lines": self.snippet_lines, "max_per_class": self.max_per_class}

    # ------------------------------------------------------------------ labels
    def _raw_label(self, rec: Record) -> Any:
        if len(self.label_fields) > 1:
            missing = [f for f in self.label_fields if f not in rec]
            if missing:
                raise ValueError(
                    f"{rec.where or 'a record'}: has no label field {missing[0]!r} (fields: {sorted(rec)}); pass "
                    "--data.label_field with the right column names or fix the data"
                )
            return [rec[f] for f in self.label_fields]
        return next(iter(iter_field([rec], self.label_fields[0], "label")))[1]

    def _infer_labels(self) -> None:
        train = self.records()["train"]
        values = [self._raw_label(r) for r in train]
        if self._problem_type is None:
            # numbers (or, in csv / tsv, strings of numbers) that are not all whole: a regression target
            numbers = [_numeric(v) for v in values]
            if any(isinstance(v, (list, tuple)) for v in values):
                self._problem_type = "multi_label_classification"
            elif all(x is not None for x in numbers) and any(not x.is_integer() for x in numbers):  # type: ignore[union-attr]
                self._problem_type = "regression"
            else:
                self._problem_type = "single_label_classification"
        if self._label_names is not None:
            return
        if self._problem_type == "regression":
            self._label_names = [self.label_field]
        elif self._problem_type == "multi_label_classification":
            names: set[str] = set()
            width = 0
            for v in values:
                items = v if isinstance(v, (list, tuple)) else [v]
                if items and all(_is_number(x) or isinstance(x, bool) for x in items):
                    width = max(width, len(items))  # a 0/1 vector
                else:
                    names.update(str(x) for x in items)
            self._label_names = _natural_sorted(names) if names else [str(i) for i in range(width)]
        else:
            self._label_names = infer_class_names(zip(train, values))
        if not self._label_names:
            raise ValueError("no labels found in the training split; check --data.label_field")

    def _target(self, rec: Record) -> int | float | list[float]:
        value = self._raw_label(rec)
        pt = self.problem_type
        if pt == "regression":
            try:
                target = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{rec.where or 'a record'}: regression target {value!r} is not a number; fix the record or "
                    "set problem_type"
                ) from None
            if not math.isfinite(target):  # a NaN / inf target makes the loss non-finite at its step
                raise ValueError(
                    f"{rec.where or 'a record'}: regression target {value!r} is not a finite number; fix or drop "
                    "the record"
                )
            return target
        if pt == "single_label_classification":
            return self._class_id(rec, value)
        items = value if isinstance(value, (list, tuple)) else [value]
        n = self.num_labels
        if len(self.label_fields) > 1 or (items and all(_is_number(x) or isinstance(x, bool) for x in items)):
            # a 0/1 vector (or 0/1 columns)
            try:
                vec = [float(x) for x in items]
            except (TypeError, ValueError):
                vec = None
            if vec is None or not all(0.0 <= x <= 1.0 for x in vec):  # also refuses NaN
                raise ValueError(
                    f"{rec.where or 'a record'}: multi-label targets {items!r} must be numbers in [0, 1] (1 = the "
                    "label applies); fix the record"
                )
            if len(vec) != n:
                raise ValueError(
                    f"{rec.where or 'a record'}: multi-label vector has {len(vec)} entries but there are {n} label "
                    f"names {self.label_names}; fix the record or --data.label_names"
                )
            return vec
        vec = [0.0] * n
        for x in items:
            vec[self._class_id(rec, str(x))] = 1.0
        return vec

    # ------------------------------------------------------------------ examples
    def _build_split(self, split: str, records: list[Record]) -> Dataset:
        texts = []
        for rec, text in iter_field(records, self.text_field, "text"):
            if not isinstance(text, str):
                raise ValueError(f"{rec.where or 'a record'}: text {text!r} is not a string; fix the record")
            texts.append(text)
        tok = self.tokenizer
        encoded = tok.encode_batch(texts)
        examples = []
        for rec, ids in zip(records, encoded):
            if self.add_bos:  # a bos id exists: checked in __init__
                ids = [tok.bos_token_id, *ids]
            if self.add_eos:
                ids = [*ids, tok.eos_token_id]
            if not ids:
                raise ValueError(f"{rec.where or 'a record'}: the text is empty; fill it or remove the record")
            (ids,) = self._cut_to_max_length(rec, ids)
            examples.append({"input_ids": ids, "labels": self._target(rec)})
        self._example_records[split] = records
        ds = ExampleDataset(examples)
        self.efficiency[split] = self._padded_efficiency(ds.lengths, self.batch_size)
        return ds

    def decode_predictions(self, index: torch.Tensor, predictions: torch.Tensor) -> list[dict[str, Any]]:
        """Predictions of a predict batch, named: one dict per example with its text, true and predicted label.

        ``predictions``: (B,) class ids (single-label), (B, num_labels) 0/1 decisions (multi-label) or (B,)
        values (regression).
        """
        out = []
        names = self.label_names
        for i, pred in zip(index.tolist(), predictions.tolist()):
            rec = self.predict_record(i)
            if self.problem_type == "single_label_classification":
                named: Any = names[int(pred)]
            elif self.problem_type == "multi_label_classification":
                named = [n for n, p in zip(names, pred) if p]
            else:
                named = float(pred)
            row = {"index": i, "text": rec.get(self.text_field), "prediction": named}
            if all(f in rec for f in self.label_fields):
                row["label"] = self._raw_label(rec)
            out.append(row)
        return out

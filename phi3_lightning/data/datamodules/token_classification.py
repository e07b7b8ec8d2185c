"""Token-classification DataModule: a list of words and one label per word, aligned to sub-word tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ..collate import IGNORE_INDEX
from ..embedded import token_type_names
from ..sources import Record, iter_field
from .base import ExampleDataset, _BaseDataModule
from .labels import _LabelMixin, infer_class_names


class TokenClassificationDataModule(_LabelMixin, _BaseDataModule):
    """Token classification: a list of words and one label per word, aligned to sub-word tokens.

    Each word is tokenised on its own (prefixed with ``word_separator`` unless it is the first), so a word maps to
    one or more tokens; its label goes to the first of them and the rest get -100 (or the same label, with
    ``label_all_subtokens``). ``labels`` is (B, T) long, -100 on padding.

    The embedded default: each token of a few lines of stdlib code, labelled with its Python ``tokenize`` type
    (NAME, OP, STRING, NUMBER, COMMENT, NEWLINE, NL, ...).

    Args:
        tokenizer: ``"byte"`` or a checkpoint directory holding ``tokenizer.json``.
        source: ``"embedded"``, a data file (jsonl / json / parquet: list fields), a directory with ``train.*``
            files, a ``datasets`` ``save_to_disk`` directory, or ``hf:NAME[:CONFIG]``; from Python also a ``datasets`` object
            (see ``CausalLMDataModule``).
        train_file: a training file; overrides the source's train split.
        val_file: a validation file; default: ``val_fraction`` of train.
        test_file: a test file (also the predict split); default: ``test_fraction`` of train, else the val split.
        words_field: field holding the list of words.
        label_field: field holding the list of word labels (names or class indices).
        label_names: the classes, in class-id order; default: read from the training split (sorted).
        label_all_subtokens: label every sub-token of a word (true) or only the first (false, the rest -100).
        word_separator: text put before every word but the first when tokenising it.
        max_length: maximum tokens per example.
        truncate: cut examples longer than ``max_length`` (true) or raise an error (false).
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
        max_files: embedded data: stdlib files to read.
        max_examples: embedded data: examples in all.
        lines_per_example: embedded data: lines of code per example.
        cache_dir: embedded cache directory; default ``$PHI3_LIGHTNING_CACHE`` or ``~/.cache/phi3_lightning``.
        seed: seed of the split hash, the shuffle and the batch order.
        progress: show a progress bar while building the embedded data.
    """

    _embedded_kind = "token_types"
    task = "token_classification"

    def __init__(
        self,
        tokenizer: str = "byte",
        source: str | Any = "embedded",
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        words_field: str = "words",
        label_field: str = "labels",
        label_names: list[str] | None = None,
        label_all_subtokens: bool = False,
        word_separator: str = " ",
        max_length: int = 256,
        truncate: bool = True,
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
        max_files: int | None = 40,
        max_examples: int | None = 3000,
        lines_per_example: int = 4,
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
        )
        for name, path in (
            ("source", source),
            ("train_file", train_file),
            ("val_file", val_file),
            ("test_file", test_file),
        ):
            if path and str(path).lower().endswith(".txt"):
                raise ValueError(
                    f"{name}={path!r} is a .txt file: plain text has no words with one label each; token "
                    f"classification reads records holding a {words_field!r} list and a {label_field!r} list "
                    "(jsonl / json / parquet / a datasets directory)"
                )
        self.words_field = words_field
        self.label_field = label_field
        self.label_all_subtokens = label_all_subtokens
        self.word_separator = word_separator
        self.truncate = truncate
        self.max_files = max_files
        self.max_examples = max_examples
        self.lines_per_example = lines_per_example
        self._problem_type = "single_label_classification"
        self._label_names = list(label_names) if label_names is not None else None
        if self._label_names is None and self.is_embedded:
            self._label_names = token_type_names()
        self._save_hyperparameters()

    def _embedded_params(self) -> dict[str, Any]:
        return {
            "max_files": self.max_files,
            "max_examples": self.max_examples,
            "lines_per_example": self.lines_per_example,
        }

    def _words_and_labels(self, rec: Record) -> tuple[list[str], list[Any]]:
        where = rec.where or "a record"
        words = next(iter(iter_field([rec], self.words_field, "words")))[1]
        labels = next(iter(iter_field([rec], self.label_field, "label")))[1]
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{where}: {self.words_field!r} must be a list of strings, got {str(words)[:80]!r}")
        if not isinstance(labels, (list, tuple)):
            raise ValueError(f"{where}: {self.label_field!r} must be a list (one label per word), got {labels!r}")
        if len(words) != len(labels):
            raise ValueError(f"{where}: {len(words)} words but {len(labels)} labels; give exactly one label per word")
        return list(words), list(labels)

    def _infer_labels(self) -> None:
        self._label_names = infer_class_names(
            (rec, lab) for rec in self.records()["train"] for lab in self._words_and_labels(rec)[1]
        )
        if not self._label_names:
            raise ValueError("no word labels found in the training split; check --data.label_field")

    def _build_split(self, split: str, records: list[Record]) -> Dataset:
        pieces: list[str] = []
        per_record: list[tuple[Record, list[str], list[int]]] = []
        for rec in records:
            words, labels = self._words_and_labels(rec)
            ids = [self._class_id(rec, lab) for lab in labels]
            per_record.append((rec, words, ids))
            pieces.extend(w if j == 0 else self.word_separator + w for j, w in enumerate(words))
        encoded = self.tokenizer.encode_batch(pieces)
        examples = []
        k = 0
        for rec, _words, class_ids in per_record:
            input_ids: list[int] = []
            labels_out: list[int] = []
            word_ids: list[int] = []
            for j, cls in enumerate(class_ids):
                toks = encoded[k]
                k += 1
                input_ids.extend(toks)
                word_ids.extend([j] * len(toks))
                if toks:
                    rest = cls if self.label_all_subtokens else IGNORE_INDEX
                    labels_out.extend([cls] + [rest] * (len(toks) - 1))
            if not input_ids:
                raise ValueError(f"{rec.where or 'a record'}: no words to tokenize; fill it or remove the record")
            input_ids, labels_out, word_ids = self._cut_to_max_length(rec, input_ids, labels_out, word_ids)
            examples.append({"input_ids": input_ids, "labels": labels_out, "word_ids": word_ids})
        self._example_records[split] = records
        ds = _TokenDataset(examples)
        self.efficiency[split] = self._padded_efficiency(ds.lengths, self.batch_size)
        return ds

    def decode_predictions(self, index: torch.Tensor, predictions: torch.Tensor) -> list[dict[str, Any]]:
        """Per-word predicted label names of a predict batch (the prediction at each word's first token).

        ``predictions``: (B, T) class ids aligned with the batch's ``input_ids``, in the padding layout of the
        batch (``padding_side``). Words cut off by truncation get ``None``.
        """
        out = []
        names = self.label_names
        ds: _TokenDataset = self.datasets["test"]  # type: ignore[assignment]
        T = predictions.shape[1]
        for row, i in enumerate(index.tolist()):
            word_ids = ds.examples[i]["word_ids"]
            offset = T - len(word_ids) if self.padding_side == "left" else 0
            rec = self.predict_record(i)
            words = rec.get(self.words_field, [])
            preds: list[str | None] = [None] * len(words)
            seen = set()
            for t, w in enumerate(word_ids):
                if w not in seen:
                    seen.add(w)
                    preds[w] = names[int(predictions[row, offset + t])]
            out.append({"index": i, "words": words, "labels": rec.get(self.label_field), "predictions": preds})
        return out


class _TokenDataset(ExampleDataset):
    """Token-classification examples; ``word_ids`` stay here and are not part of the batch."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        return {"input_ids": ex["input_ids"], "labels": ex["labels"]}

"""LightningDataModules feeding the three heads: causal LM, sequence classification, token classification.

Each one takes plain typed constructor arguments (LightningCLI exposes them as ``--data.*``, with the ``Args:``
docstrings as help), loads its tokenizer at construction, and after ``setup()`` serves batches that follow the
batch convention of ``collate.py``. All of them default to the embedded stdlib datasets (``embedded.py``), so they
work on a fresh machine with no download.

Attributes (available right after ``__init__``; the label ones are read lazily from the data when not given):

* ``tokenizer``, ``vocab_size``, ``pad_token_id``;
* classification modules: ``num_labels``, ``label_names``, ``problem_type``
  (``"single_label_classification"`` / ``"multi_label_classification"`` / ``"regression"``);
* after ``setup()``: ``datasets`` (split -> dataset), ``efficiency`` (split -> fraction of real tokens per
  batch slot; causal LM: of the packed rows).

The predict dataloader serves the test split in order, and its batches carry ``index`` (B,), the position of each
item in that split. For the classification modules an item is one record: ``predict_record(i)`` gives it back and
``decode_predictions(index, predictions)`` names the predictions with ``label_names``. (For the causal LM an item is a
packed row or a chunk of a document.)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from .chat import tokenize_chat
from .collate import IGNORE_INDEX, LengthGroupedSampler, PaddingCollator, padding_efficiency
from .embedded import DEFAULT_PACKAGES, available_packages, embedded_splits, load_embedded, token_type_names
from .packing import PACKING_STRATEGIES, PackedRows, pack_documents
from .sampling import EpochSampler, ResumableDataLoader, rank_state, rng_states
from .sources import SPLITS, Record, iter_field, load_source, resolve_splits
from .tokenizer import CHAT_FORMATS, load_tokenizer

__all__ = [
    "CausalLMDataModule",
    "SequenceClassificationDataModule",
    "TokenClassificationDataModule",
    "PROBLEM_TYPES",
]

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


class ExampleDataset(Dataset):
    """A list of examples (dicts of lists) with their token lengths."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples
        self.lengths = [len(ex["input_ids"]) for ex in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


class _Indexed(Dataset):
    """Adds ``"index"`` (the example's position in its split) to every item (predict dataloaders)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.base[i], "index": i}


def _chunks(seq: list[int], size: int) -> list[list[int]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


class _BaseDataModule(pl.LightningDataModule):
    """Shared plumbing: tokenizer, sources and splits, dataloaders."""

    _embedded_kind: str = ""

    def __init__(
        self,
        tokenizer: str,
        source: str,
        train_file: str | None,
        val_file: str | None,
        test_file: str | None,
        val_fraction: float,
        test_fraction: float,
        max_length: int,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        padding_side: str,
        pad_to_multiple_of: int | None,
        group_by_length: bool,
        max_documents: int | None,
        text_field: str,
        text_unit: str,
        cache_dir: str | None,
        seed: int,
        progress: bool,
    ) -> None:
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value}; use a positive integer")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={eval_batch_size}; use a positive integer or None")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}; use 0 (load in the main process) or more")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}; use 'right' or 'left'")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{name}={frac}; use a fraction in [0, 1)")
        if source == "embedded" and not train_file and (val_file or test_file):
            raise ValueError(
                f"val_file={val_file!r} / test_file={test_file!r} given without a train_file while source='embedded'; "
                "pass train_file (or a source) for your own data, or drop val_file/test_file to use the embedded data"
            )
        self.tokenizer_spec = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self.source = source
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.max_documents = max_documents
        self.text_field = text_field
        self.text_unit = text_unit
        self.cache_dir = cache_dir
        self.seed = seed
        self.progress = progress
        self.datasets: dict[str, Dataset] = {}
        self.efficiency: dict[str, float] = {}
        self._records: dict[str, list[Record]] | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    # ---------------------------------------------------------------- tokenizer facts
    @property
    def vocab_size(self) -> int:
        """Ids the model's embedding must hold (max tokenizer id + 1)."""
        return self.tokenizer.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def is_embedded(self) -> bool:
        return self.source == "embedded" and not self.train_file

    # ---------------------------------------------------------------- records
    def _embedded_params(self) -> dict[str, Any]:
        raise NotImplementedError

    def records(self) -> dict[str, list[Record]]:
        """train / val / test records (read once, then kept)."""
        if self._records is None:
            if self.is_embedded:
                self._records = embedded_splits(
                    self._embedded_kind,
                    self.val_fraction,
                    self.test_fraction,
                    self.seed,
                    cache_dir=self.cache_dir,
                    progress=self.progress,
                    **self._embedded_params(),
                )
            else:
                given = load_source(
                    "" if self.source == "embedded" else self.source,
                    self.train_file,
                    self.val_file,
                    self.test_file,
                    text_field=self.text_field,
                    text_unit=self.text_unit,
                    limit=self.max_documents,
                )
                self._records = resolve_splits(given, self.val_fraction, self.test_fraction, self.seed)
        return self._records

    def predict_record(self, index: int) -> Record:
        """The record behind item ``index`` of the predict (= test) split."""
        return self._example_records["test"][index]

    # ---------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Build the embedded cache once (Lightning calls this on one process per node)."""
        if self.is_embedded:
            load_embedded(
                self._embedded_kind, cache_dir=self.cache_dir, progress=self.progress, **self._embedded_params()
            )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        records = self.records()
        self._example_records: dict[str, list[Record]] = {}
        for split in SPLITS:
            recs = records.get(split) or []
            if not recs:
                if split == "train":
                    raise ValueError(f"the train split of source {self.source!r} is empty; add data")
                continue
            if split == "test" and recs is records.get("val") and "val" in self.datasets:
                self.datasets["test"] = self.datasets["val"]  # no test split of its own: test = val
                self._example_records["test"] = self._example_records["val"]
                if "val" in self.efficiency:
                    self.efficiency["test"] = self.efficiency["val"]
                continue
            self.datasets[split] = self._build_split(split, recs)
        parts = [f"{s}={len(d)}" for s, d in self.datasets.items()]  # type: ignore[arg-type]
        eff = ", ".join(f"{s} {e:.1%}" for s, e in self.efficiency.items())
        rank_zero_info(f"{type(self).__name__}: {', '.join(parts)} examples; real-token fraction: {eff}")

    def _build_split(self, split: str, records: list[Record]) -> Dataset:
        raise NotImplementedError

    # ---------------------------------------------------------------- dataloaders
    def _collator(self) -> PaddingCollator:
        return PaddingCollator(
            self.pad_token_id, padding_side=self.padding_side, pad_to_multiple_of=self.pad_to_multiple_of
        )

    def _loader(self, split: str, train: bool, indexed: bool = False) -> DataLoader:
        if not self.datasets:
            self.setup()
        if split not in self.datasets:
            origin = self.train_file or self.source
            raise ValueError(
                f"there is no {split} split (data from {origin!r}, val_fraction={self.val_fraction}, "
                f"test_fraction={self.test_fraction}); give a {split}_file or a non-zero {split}_fraction"
            )
        dataset = self.datasets[split]
        batch_size = self.batch_size if train else self.eval_batch_size
        common: dict[str, Any] = dict(
            collate_fn=self._collator(), num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            generator=torch.Generator(),  # iterating a loader draws a worker seed: never from the global RNG
        )
        lengths = getattr(dataset, "lengths", None) if self.group_by_length else None
        if train:
            replicas, rank = self._data_parallel()
            sampler = EpochSampler(
                dataset, self.seed, num_replicas=replicas, rank=rank, batch_size=batch_size, lengths=lengths
            )
            loader = ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, **common)
            loader.rng_to_restore, self._rng_to_restore = self._rng_to_restore, None
            return loader
        if indexed:
            return DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, **common)
        sampler = SequentialSampler(dataset)
        if lengths is not None:
            batch_sampler = LengthGroupedSampler(sampler, batch_size, drop_last=False, lengths=lengths, shuffle=False)
            return DataLoader(dataset, batch_sampler=batch_sampler, **common)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **common)

    def _data_parallel(self) -> tuple[int, int]:
        """(data-parallel processes, this one's rank) the train sampler shards over; (1, 0) outside a Trainer."""
        trainer = self.trainer
        if trainer is None or not trainer._accelerator_connector.use_distributed_sampler:
            return 1, 0
        kwargs = trainer.distributed_sampler_kwargs
        if not kwargs:
            return 1, 0
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    # ---------------------------------------------------------------- resume state (in every checkpoint)
    def state_dict(self) -> dict[str, Any]:
        """The global torch RNG state of every process (dropout), put back right before the first training batch of
        a resumed run. (The train loader's position in its epoch is saved by Lightning from the loader itself.)"""
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng")
        self._rng_to_restore = rank_state(states) if states else None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split in order; batches carry ``index`` (B,)."""
        return self._loader("test", train=False, indexed=True)

    def _padded_efficiency(self, lengths: Sequence[int], batch_size: int) -> float:
        """Real-token fraction of this split's batches (grouped by length when ``group_by_length``)."""
        if not lengths:
            return 0.0
        order = list(range(len(lengths)))
        if self.group_by_length:
            sampler = LengthGroupedSampler(order, batch_size, lengths=lengths, shuffle=False)
            batches = [[lengths[i] for i in b] for b in sampler]
        else:
            batches = [[lengths[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
        return padding_efficiency(batches, self.pad_to_multiple_of)


# ======================================================================================================================
# causal LM
# ======================================================================================================================


class CausalLMDataModule(_BaseDataModule):
    """Causal language modelling: plain text (pretraining style, packed) or chat / instruction data.

    Text records become documents (``add_eos`` appends the eos id), packed into rows of ``max_length`` tokens with
    ``position_ids`` restarting per document (``pack=True``), or padded per batch (``pack=False``). Chat records
    (``messages`` lists of ``{"role", "content"}``) are rendered with the checkpoint's chat template and trained on
    the assistant tokens only. Labels are the input ids (not shifted; the model shifts), -100 where not trained.

    Args:
        tokenizer: ``"byte"`` (built in, 262 ids) or a checkpoint directory holding ``tokenizer.json``.
        source: ``"embedded"`` (stdlib source code, no download), a data file, a directory with ``train.*`` /
            ``val.*`` / ``test.*`` files, a ``datasets`` ``save_to_disk`` directory, or ``hf:NAME[:CONFIG]``.
        train_file: a training file (jsonl / json / csv / tsv / txt / parquet); overrides the source's train split.
        val_file: a validation file; default: ``val_fraction`` of train.
        test_file: a test file (also the predict split); default: ``test_fraction`` of train, else the val split.
        data_format: ``"text"``, ``"chat"`` or ``"auto"`` (chat when records have ``messages_field``).
        text_field: field holding the text of text records.
        messages_field: field holding the message list of chat records.
        chat_format: override the chat layout (``phi3``, ``phi4-mini``, ``phi4``, ``byte``); default: the
            tokenizer's, detected from its chat template.
        max_length: tokens per packed row, or the maximum length of a padded example.
        pack: pack documents into full rows (true) or pad each batch to its longest example (false).
        split_long: split documents longer than ``max_length`` into pieces (true) or raise an error (false).
        packing_strategy: ``"best_fit"`` (fullest rows) or ``"sequential"`` (keeps document order).
        add_bos: prepend the tokenizer's bos id to every document.
        add_eos: append the tokenizer's eos id to every text document (and after a chat's last assistant turn).
        batch_size: training batch size (rows or examples).
        eval_batch_size: validation / test / predict batch size; default ``batch_size``.
        num_workers: dataloader worker processes (0: load in the main process).
        padding_side: ``"right"`` or ``"left"`` (unpacked batches).
        pad_to_multiple_of: round padded lengths up to a multiple of this.
        group_by_length: batch examples of similar length together (unpacked batches).
        val_fraction: fraction of train carved out as the val split when no val split is given.
        test_fraction: fraction of train carved out as the test split when no test split is given (0: test = val).
        max_files: embedded corpus: number of stdlib files (documents).
        max_documents: read at most this many records per split file (all sources).
        text_unit: how ``.txt`` files are cut into documents: ``"paragraph"``, ``"line"`` or ``"file"``.
        cache_dir: where the embedded corpus is cached; default ``$PHI3_LIGHTNING_CACHE`` or
            ``~/.cache/phi3_lightning``.
        seed: seed of the split hash, the shuffle and the batch order.
        progress: show a progress bar while building the embedded corpus.
    """

    _embedded_kind = "lm"

    def __init__(
        self,
        tokenizer: str = "byte",
        source: str = "embedded",
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        data_format: str = "auto",
        text_field: str = "text",
        messages_field: str = "messages",
        chat_format: str | None = None,
        max_length: int = 256,
        pack: bool = True,
        split_long: bool = True,
        packing_strategy: str = "best_fit",
        add_bos: bool = False,
        add_eos: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_files: int | None = 100,
        max_documents: int | None = None,
        text_unit: str = "paragraph",
        cache_dir: str | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(
            tokenizer, source, train_file, val_file, test_file, val_fraction, test_fraction, max_length, batch_size,
            eval_batch_size, num_workers, padding_side, pad_to_multiple_of, group_by_length, max_documents,
            text_field, text_unit, cache_dir, seed, progress,
        )  # fmt: skip
        if max_length < 2:  # the head predicts token t+1 from tokens <= t: a 1-token row has no target
            raise ValueError(f"max_length={max_length}: a causal-LM row needs at least 2 tokens to have a next-token "
                             "target (with 1 every label is ignored and the loss is NaN); use max_length >= 2")
        if data_format not in ("auto", "text", "chat"):
            raise ValueError(f"data_format={data_format!r}; use 'auto', 'text' or 'chat'")
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format={chat_format!r}; use one of {CHAT_FORMATS} or None (the tokenizer's)")
        if packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy={packing_strategy!r}; use one of {PACKING_STRATEGIES}")
        self.data_format = data_format
        self.messages_field = messages_field
        self.chat_format = chat_format or self.tokenizer.chat_format
        self.pack = pack
        self.split_long = split_long
        self.packing_strategy = packing_strategy
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.max_files = max_files
        self.save_hyperparameters()

    def _embedded_params(self) -> dict[str, Any]:
        return {"max_files": self.max_files, "max_documents": self.max_documents}

    def resolved_format(self) -> str:
        """``"text"`` or ``"chat"`` (``data_format="auto"`` looks at the first training record)."""
        if self.data_format != "auto":
            return self.data_format
        first = self.records()["train"][0]
        if self.messages_field in first:
            return "chat"
        if self.text_field in first:
            return "text"
        raise ValueError(
            f"{first.where or 'the first record'}: has neither a text field {self.text_field!r} nor a messages "
            f"field {self.messages_field!r} (fields: {sorted(first)}); pass --data.text_field or "
            "--data.messages_field with the right name"
        )

    def _tokenize(
        self, split: str, records: list[Record]
    ) -> tuple[list[list[int]], list[list[int]] | None, list[Record]]:
        """(token ids, labels or None = the ids, the record of each document); empty documents are dropped."""
        tok = self.tokenizer
        if self.resolved_format() == "text":
            texts = []
            for rec, text in iter_field(records, self.text_field, "text"):
                if not isinstance(text, str):
                    raise ValueError(
                        f"{rec.where or 'a record'}: text field {self.text_field!r} holds a {type(text).__name__}, "
                        "not a string; fix the record or pass the right --data.text_field"
                    )
                texts.append(text)
            encoded = tok.encode_batch(texts)
            bos = [tok.bos_token_id] if self.add_bos and tok.bos_token_id is not None else []
            eos = [tok.eos_token_id] if self.add_eos else []
            kept = [(bos + d + eos, r) for d, r in zip(encoded, records) if d]
            return [d for d, _ in kept], None, [r for _, r in kept]
        docs, labels, origins = [], [], []
        dropped = 0
        for rec, messages in iter_field(records, self.messages_field, "messages"):
            try:
                ex = tokenize_chat(messages, tok, self.chat_format, add_bos=self.add_bos, add_eos=self.add_eos)
            except ValueError as e:
                raise ValueError(f"{rec.where or 'a record'}: {e}") from None
            if all(x == IGNORE_INDEX for x in ex["labels"]):
                dropped += 1  # nothing to learn from (no assistant turn)
                continue
            docs.append(ex["input_ids"])
            labels.append(ex["labels"])
            origins.append(rec)
        if dropped:
            warnings.warn(f"{split}: dropped {dropped} conversations without an assistant turn", stacklevel=2)
        return docs, labels, origins

    def _build_split(self, split: str, records: list[Record]) -> Dataset:
        docs, labels, origins = self._tokenize(split, records)
        if not docs:
            raise ValueError(
                f"the {split} split has no tokens after tokenization ({len(records)} records, all empty); check "
                f"--data.text_field / --data.messages_field and the data"
            )
        if not self.split_long:
            for doc, rec in zip(docs, origins):
                if len(doc) > self.max_length:
                    raise ValueError(
                        f"{rec.where or 'a ' + split + ' record'}: {len(doc)} tokens, more than max_length="
                        f"{self.max_length} (the {'row' if self.pack else 'sequence'} length) and split_long=False; "
                        "raise max_length, set split_long=True to split long documents, or shorten the record"
                    )
        self._example_records[split] = records
        if self.pack:
            rows: PackedRows = pack_documents(
                docs, self.max_length, self.pad_token_id, split_long=self.split_long, labels=labels,
                strategy=self.packing_strategy,
            )  # fmt: skip
            self.efficiency[split] = rows.efficiency
            return rows
        examples = []
        for d, doc in enumerate(docs):
            lab = doc if labels is None else labels[d]
            for ids, lbl in zip(_chunks(doc, self.max_length), _chunks(lab, self.max_length)):
                examples.append({"input_ids": ids, "labels": lbl})
        ds = ExampleDataset(examples)
        self.efficiency[split] = self._padded_efficiency(ds.lengths, self.batch_size)
        return ds


# ======================================================================================================================
# sequence classification
# ======================================================================================================================


def _natural_sorted(names: set[str]) -> list[str]:
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _LabelMixin:
    """Label names, problem type and label -> target encoding for the classification modules."""

    label_field: str
    _label_names: list[str] | None
    _problem_type: str | None

    def _label_values(self) -> list[tuple[Record, Any]]:
        raise NotImplementedError

    def _infer_labels(self) -> None:
        raise NotImplementedError

    @property
    def label_names(self) -> list[str]:
        """Names of the classes (or of the regression target), in class-id order."""
        if self._label_names is None:
            self._infer_labels()
        return list(self._label_names)  # type: ignore[arg-type]

    @property
    def num_labels(self) -> int:
        """Size of the classification head's output."""
        return len(self.label_names)

    @property
    def problem_type(self) -> str:
        if self._problem_type is None:
            self._infer_labels()
        return self._problem_type  # type: ignore[return-value]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}

    def _unknown(self, rec: Record, value: Any) -> ValueError:
        return ValueError(
            f"{rec.where or 'a record'}: label {value!r} is not one of the label names {self.label_names}; add it to "
            "--data.label_names or fix the record"
        )

    def _class_id(self, rec: Record, value: Any) -> int:
        names = self.label_names
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int):
            if 0 <= value < len(names):
                return value
            raise ValueError(
                f"{rec.where or 'a record'}: label {value} is out of range for {len(names)} label names {names}; "
                "fix the record or list all classes in --data.label_names"
            )
        if isinstance(value, float) and value.is_integer():
            return self._class_id(rec, int(value))
        if isinstance(value, str):
            idx = self.label2id.get(value)
            if idx is None:
                raise self._unknown(rec, value)
            return idx
        raise ValueError(
            f"{rec.where or 'a record'}: label {value!r} has type {type(value).__name__}; use a class name or index"
        )


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
            ``save_to_disk`` directory, or ``hf:NAME[:CONFIG]``.
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
        add_bos: prepend the tokenizer's bos id.
        add_eos: append the tokenizer's eos id (the head pools the last non-pad token).
        batch_size: training batch size.
        eval_batch_size: validation / test / predict batch size; default ``batch_size``.
        num_workers: dataloader worker processes.
        padding_side: ``"right"`` or ``"left"``.
        pad_to_multiple_of: round padded lengths up to a multiple of this.
        group_by_length: batch examples of similar length together.
        val_fraction: fraction of train carved out as val when no val split is given.
        test_fraction: fraction of train carved out as test when no test split is given (0: test = val).
        max_documents: read at most this many records per split file.
        packages: embedded data: the stdlib packages that are the classes (those present are used).
        snippet_lines: embedded data: lines per snippet.
        max_per_class: embedded data: snippets per package.
        cache_dir: embedded cache directory; default ``$PHI3_LIGHTNING_CACHE`` or ``~/.cache/phi3_lightning``.
        seed: seed of the split hash, the shuffle and the batch order.
        progress: show a progress bar while building the embedded data.
    """

    _embedded_kind = "code_cls"

    def __init__(
        self,
        tokenizer: str = "byte",
        source: str = "embedded",
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
        packages: list[str] = list(DEFAULT_PACKAGES),
        snippet_lines: int = 8,
        max_per_class: int | None = 200,
        cache_dir: str | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(
            tokenizer, source, train_file, val_file, test_file, val_fraction, test_fraction, max_length, batch_size,
            eval_batch_size, num_workers, padding_side, pad_to_multiple_of, group_by_length, max_documents,
            text_field, "paragraph", cache_dir, seed, progress,
        )  # fmt: skip
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={problem_type!r}; use one of {PROBLEM_TYPES} or None (inferred)")
        self.label_field = label_field
        self.label_fields = [f.strip() for f in label_field.split(",") if f.strip()]
        if not self.label_fields:
            raise ValueError(f"label_field={label_field!r}; name the field holding the label")
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
        self.save_hyperparameters()

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
            if any(isinstance(v, (list, tuple)) for v in values):
                self._problem_type = "multi_label_classification"
            elif all(_is_number(v) for v in values) and any(isinstance(v, float) and not v.is_integer() for v in values):
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
            if all(_is_number(v) or isinstance(v, bool) for v in values):
                top = max(int(v) for v in values)
                self._label_names = [str(i) for i in range(top + 1)]
            else:
                self._label_names = _natural_sorted({str(v) for v in values})
        if not self._label_names:
            raise ValueError("no labels found in the training split; check --data.label_field")

    def _target(self, rec: Record) -> int | float | list[float]:
        value = self._raw_label(rec)
        pt = self.problem_type
        if pt == "regression":
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{rec.where or 'a record'}: regression target {value!r} is not a number; fix the record or "
                    "set problem_type"
                ) from None
        if pt == "single_label_classification":
            return self._class_id(rec, value)
        items = value if isinstance(value, (list, tuple)) else [value]
        n = self.num_labels
        if len(self.label_fields) > 1 or (items and all(_is_number(x) or isinstance(x, bool) for x in items)):
            # a 0/1 vector (or 0/1 columns)
            try:
                vec = [float(x) for x in items]
            except (TypeError, ValueError):
                raise ValueError(
                    f"{rec.where or 'a record'}: multi-label targets {items!r} must be 0/1 numbers; fix the record"
                ) from None
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
            if self.add_bos and tok.bos_token_id is not None:
                ids = [tok.bos_token_id, *ids]
            if self.add_eos:
                ids = [*ids, tok.eos_token_id]
            if not ids:
                raise ValueError(f"{rec.where or 'a record'}: the text is empty; fill it or remove the record")
            if len(ids) > self.max_length:
                if not self.truncate:
                    raise ValueError(
                        f"{rec.where or 'a record'}: {len(ids)} tokens, more than max_length={self.max_length}; "
                        "raise max_length or set truncate=True"
                    )
                ids = ids[: self.max_length]
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


# ======================================================================================================================
# token classification
# ======================================================================================================================


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
            files, a ``datasets`` ``save_to_disk`` directory, or ``hf:NAME[:CONFIG]``.
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
        max_documents: read at most this many records per split file.
        max_files: embedded data: stdlib files to read.
        max_examples: embedded data: examples in all.
        lines_per_example: embedded data: lines of code per example.
        cache_dir: embedded cache directory; default ``$PHI3_LIGHTNING_CACHE`` or ``~/.cache/phi3_lightning``.
        seed: seed of the split hash, the shuffle and the batch order.
        progress: show a progress bar while building the embedded data.
    """

    _embedded_kind = "token_types"

    def __init__(
        self,
        tokenizer: str = "byte",
        source: str = "embedded",
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
        max_files: int | None = 40,
        max_examples: int | None = 3000,
        lines_per_example: int = 4,
        cache_dir: str | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(
            tokenizer, source, train_file, val_file, test_file, val_fraction, test_fraction, max_length, batch_size,
            eval_batch_size, num_workers, padding_side, pad_to_multiple_of, group_by_length, max_documents,
            words_field, "paragraph", cache_dir, seed, progress,
        )  # fmt: skip
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
        self.save_hyperparameters()

    def _embedded_params(self) -> dict[str, Any]:
        return {"max_files": self.max_files, "max_examples": self.max_examples, "lines_per_example": self.lines_per_example}

    def _words_and_labels(self, rec: Record) -> tuple[list[str], list[Any]]:
        where = rec.where or "a record"
        words = next(iter(iter_field([rec], self.words_field, "words")))[1]
        labels = next(iter(iter_field([rec], self.label_field, "label")))[1]
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{where}: {self.words_field!r} must be a list of strings, got {str(words)[:80]!r}")
        if not isinstance(labels, (list, tuple)):
            raise ValueError(f"{where}: {self.label_field!r} must be a list (one label per word), got {labels!r}")
        if len(words) != len(labels):
            raise ValueError(
                f"{where}: {len(words)} words but {len(labels)} labels; give exactly one label per word"
            )
        return list(words), list(labels)

    def _infer_labels(self) -> None:
        names: set[str] = set()
        top = -1
        all_ints = True
        for rec in self.records()["train"]:
            for lab in self._words_and_labels(rec)[1]:
                if isinstance(lab, int) and not isinstance(lab, bool):
                    top = max(top, lab)
                else:
                    all_ints = False
                    names.add(str(lab))
        if all_ints:
            self._label_names = [str(i) for i in range(top + 1)]
        else:
            self._label_names = _natural_sorted(names)
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
        for rec, words, class_ids in per_record:
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
            if len(input_ids) > self.max_length:
                if not self.truncate:
                    raise ValueError(
                        f"{rec.where or 'a record'}: {len(input_ids)} tokens, more than max_length={self.max_length}; "
                        "raise max_length or set truncate=True"
                    )
                input_ids, labels_out, word_ids = (x[: self.max_length] for x in (input_ids, labels_out, word_ids))
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


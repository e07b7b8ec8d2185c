"""The shared plumbing of the DataModules: tokenizer, sources and splits, dataloaders, resume state."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from ..collate import LengthGroupedSampler, PaddingCollator, padding_efficiency
from ..embedded import embedded_splits, load_embedded
from ..sampling import EpochSampler, ResumableDataLoader, rank_state, rng_states
from ..sources import SPLITS, Record, check_streaming, describe_source, load_source, resolve_splits
from ..tokenizer import load_tokenizer
from ..warn import warn_data


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


class _BaseDataModule(pl.LightningDataModule):
    """Shared plumbing: tokenizer, sources and splits, dataloaders."""

    _embedded_kind: str = ""
    task: str = ""
    """The task whose batches this makes (a key of ``phi3_lightning.model.HEADS``, named here as a string: data/ does
    not import model/); the LightningModule refuses data of another task in ``setup``."""

    def __init__(
        self,
        *,
        tokenizer: str,
        source: str | Any,
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
        cache_dir: str | None,
        seed: int,
        progress: bool,
        text_field: str = "text",
        text_unit: str = "paragraph",
        streaming: bool = False,
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
        if isinstance(source, str) and source == "embedded" and not train_file and (val_file or test_file):
            raise ValueError(
                f"val_file={val_file!r} / test_file={test_file!r} given without a train_file while source='embedded'; "
                "pass train_file (or a source) for your own data, or drop val_file/test_file to use the embedded data"
            )
        if streaming:  # before the tokenizer loads: a wrong combination fails at once, naming the option to set
            own_files = isinstance(source, str) and source == "embedded" and train_file
            check_streaming("files" if own_files else source, max_documents, "max_documents")
        self.streaming = streaming
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
    def _check_add_bos(self, add_bos: bool) -> None:
        """``add_bos=True`` needs a bos token to prepend: without one it would do nothing, silently."""
        if add_bos and self.tokenizer.bos_token_id is None:
            raise ValueError(
                f"add_bos=True but the tokenizer {self.tokenizer_spec!r} has no bos token (no bos_token in its "
                "tokenizer_config.json / special_tokens_map.json, no bos_token_id in config.json), so there is "
                "nothing to prepend; set add_bos=False (--data.add_bos false), or use a tokenizer that defines "
                "a bos token"
            )

    @property
    def vocab_size(self) -> int:
        """Ids the model's embedding must hold (max tokenizer id + 1)."""
        return self.tokenizer.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def is_embedded(self) -> bool:
        return isinstance(self.source, str) and self.source == "embedded" and not self.train_file

    @property
    def source_name(self) -> str:
        """``source`` as messages name it (a ``datasets`` object passed from Python is described, not printed)."""
        return describe_source(self.source)

    def _save_hyperparameters(self) -> None:
        """``save_hyperparameters()`` of the calling ``__init__``; a ``datasets`` object passed as ``source`` is kept
        out of the hyperparameters (and so out of checkpoints and hparams.yaml), which record its description."""
        frame = inspect.currentframe().f_back  # type: ignore[union-attr]
        in_memory = not isinstance(self.source, str)
        self.save_hyperparameters(ignore=["source"] if in_memory else None, frame=frame)
        if in_memory:
            self.hparams["source"] = self._hparams_initial["source"] = self.source_name

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
                    "" if isinstance(self.source, str) and self.source == "embedded" else self.source,
                    self.train_file,
                    self.val_file,
                    self.test_file,
                    text_field=self.text_field,
                    text_unit=self.text_unit,
                    limit=self.max_documents,
                    streaming=self.streaming,
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
                    raise ValueError(f"the train split of source {self.source_name!r} is empty; add data")
                continue
            if split == "test" and recs is records.get("val") and "val" in self.datasets:
                self.datasets["test"] = self.datasets["val"]  # no test split of its own: test = val
                self._example_records["test"] = self._example_records["val"]
                if "val" in self.efficiency:
                    self.efficiency["test"] = self.efficiency["val"]
                continue
            self._cut = [0, 0]  # examples cut to max_length, tokens dropped (_cut_to_max_length counts them)
            self.datasets[split] = self._build_split(split, recs)
            if self._cut[0]:
                warn_data(
                    f"{split}: cut {self._cut[0]} of {len(self.datasets[split])} examples longer than max_length="
                    f"{self.max_length} ({self._cut[1]} tokens dropped from their ends); raise max_length to keep "
                    "them, or truncate=False to make this an error"
                )
        parts = [f"{s}={len(d)}" for s, d in self.datasets.items()]  # type: ignore[arg-type]
        eff = ", ".join(f"{s} {e:.1%}" for s, e in self.efficiency.items())
        rank_zero_info(
            f"{type(self).__name__}: {', '.join(parts)} examples; real-token fraction: {eff}{self._summary_extra()}"
        )

    def _summary_extra(self) -> str:
        """More facts for the one-line data summary (``"; ..."``), or ``""``."""
        return ""

    def _build_split(self, split: str, records: list[Record]) -> Dataset:
        raise NotImplementedError

    def _cut_to_max_length(self, rec: Record, *seqs: list) -> tuple[list, ...]:
        """One example's token-aligned lists (input ids first) cut to ``max_length`` when ``self.truncate`` (the
        classification modules), else an error naming the record. (The causal LM splits instead: ``split_long``.)"""
        n = len(seqs[0])
        if n <= self.max_length:
            return seqs
        if not self.truncate:  # type: ignore[attr-defined]
            raise ValueError(
                f"{rec.where or 'a record'}: {n} tokens, more than max_length={self.max_length}; "
                "raise max_length or set truncate=True"
            )
        if hasattr(self, "_cut"):
            self._cut[0] += 1
            self._cut[1] += n - self.max_length
        return tuple(x[: self.max_length] for x in seqs)

    # ---------------------------------------------------------------- dataloaders
    def _collator(self) -> PaddingCollator:
        return PaddingCollator(
            self.pad_token_id, padding_side=self.padding_side, pad_to_multiple_of=self.pad_to_multiple_of
        )

    def _loader(self, split: str, train: bool, indexed: bool = False) -> DataLoader:
        if not self.datasets:
            self.setup()
        if split not in self.datasets:
            origin = self.train_file or self.source_name
            fraction = {"val": self.val_fraction, "test": self.test_fraction}.get(split, 0.0)
            given = self.records()
            if fraction > 0 and not given.get(split) and "train" in self.datasets:
                # the hash split found no record for it: too few distinct training records (e.g. one)
                n = len(given["train"])
                raise ValueError(
                    f"there is no {split} split: {split}_fraction={fraction} carved no record out of the {n} training "
                    f"record{'s' if n != 1 else ''} (data from {origin!r}; train keeps at least one, and copies of a "
                    f"record stay together); give a {split}_file or more (distinct) training records"
                )
            raise ValueError(
                f"there is no {split} split (data from {origin!r}, val_fraction={self.val_fraction}, "
                f"test_fraction={self.test_fraction}); give a {split}_file or a non-zero {split}_fraction"
            )
        dataset = self.datasets[split]
        batch_size = self.batch_size if train else self.eval_batch_size
        common: dict[str, Any] = dict(
            collate_fn=self._collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
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
        # val / test batches carry ``index`` too: under several processes the module recognises by it the examples
        # that the DistributedSampler repeats to even out the processes, and counts each example once
        dataset = _Indexed(dataset)
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

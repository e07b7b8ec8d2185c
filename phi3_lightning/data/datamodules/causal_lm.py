"""Causal-LM DataModule: plain text (packed or padded) or chat data trained on the assistant tokens."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ..chat import tokenize_chat
from ..collate import IGNORE_INDEX
from ..packing import PACKING_STRATEGIES, PackedRows, pack_documents, piece_bounds
from ..sources import Record, iter_field, not_text_message
from ..tokenizer import CHAT_FORMATS
from ..warn import warn_data
from .base import ExampleDataset, _BaseDataModule

# split_long: warn when the continuation pieces lose at least this fraction of a split's targets (less is said in the
# data summary line)
CUT_TARGETS_WARN = 0.01


class CausalLMDataModule(_BaseDataModule):
    """Causal language modelling: plain text (pretraining style, packed) or chat / instruction data.

    Text records become documents (``add_eos`` appends the eos id), packed into rows of ``max_length`` tokens with
    ``position_ids`` restarting per document (``pack=True``), or padded per batch (``pack=False``). Chat records
    (``messages`` lists of ``{"role", "content"}``) are rendered with the checkpoint's chat template and trained on
    the assistant tokens only. Labels are the input ids (not shifted; the model shifts), -100 where not trained.

    ``datasets`` objects (from Python): ``source`` may be a ``datasets.Dataset`` (the train split), a ``DatasetDict``
    (its train / validation / test splits), or a stream (``IterableDataset`` / ``IterableDatasetDict``, e.g.
    ``load_dataset(..., streaming=True)``). A stream has no length, so ``max_documents`` is required: the first
    ``max_documents`` records of each streamed split are read in stream order and held in memory, then handled like
    any other source (val / test carved out by content hash when the stream has no such split, packed into rows,
    shuffled per epoch). Training therefore sees a fixed, map-style set of rows and a resumed run continues exactly
    where it stopped, provided the stream yields the same first records again (local data, a pinned hub revision,
    a seeded ``.shuffle``). From YAML / the command line, ``source: hf:NAME[:CONFIG]`` with ``streaming: true`` and
    ``max_documents: N`` does the same (``load_dataset(NAME, CONFIG, streaming=True)``: nothing but those records is
    downloaded); otherwise use a path: a ``save_to_disk`` directory, a parquet file, or ``hf:NAME`` (downloaded and
    prepared whole). Dataset loading scripts are never run.

    Args:
        tokenizer: ``"byte"`` (built in, 262 ids) or a checkpoint directory holding ``tokenizer.json``.
        source: ``"embedded"`` (stdlib source code, no download), a data file, a directory with ``train.*`` /
            ``val.*`` / ``test.*`` files, a ``datasets`` ``save_to_disk`` directory, or ``hf:NAME[:CONFIG]``; from
            Python also a ``datasets`` ``Dataset`` / ``DatasetDict`` / ``IterableDataset`` (stream: needs
            ``max_documents``).
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
        add_bos: prepend the tokenizer's bos id to every document (an error if the tokenizer has none).
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
        max_documents: read at most this many records per split (all sources); required for a streamed
            ``datasets.IterableDataset`` and with ``streaming``, whose first ``max_documents`` records per split are
            held in memory.
        streaming: open an ``hf:NAME[:CONFIG]`` source as a stream (``load_dataset(..., streaming=True)``) and read
            only the first ``max_documents`` records of each split, in stream order, instead of downloading and
            preparing the whole dataset; needs ``max_documents``, and applies to ``hf:`` sources only. Resuming
            exactly needs the same first records again: pin the revision or use local data.
        text_unit: how ``.txt`` files are cut into documents: ``"paragraph"``, ``"line"`` or ``"file"``.
        cache_dir: where the embedded corpus is cached; default ``$PHI3_LIGHTNING_CACHE`` or
            ``~/.cache/phi3_lightning``.
        seed: seed of the split hash, the shuffle and the batch order.
        progress: show a progress bar while building the embedded corpus.
    """

    _embedded_kind = "lm"
    task = "causal_lm"

    def __init__(
        self,
        tokenizer: str = "byte",
        source: str | Any = "embedded",
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
        streaming: bool = False,
        text_unit: str = "paragraph",
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
            text_unit=text_unit,
        )
        if max_length < 2:  # the head predicts token t+1 from tokens <= t: a 1-token row has no target
            raise ValueError(
                f"max_length={max_length}: a causal-LM row needs at least 2 tokens to have a next-token "
                "target (with 1 every label is ignored and the loss is NaN); use max_length >= 2"
            )
        if data_format not in ("auto", "text", "chat"):
            raise ValueError(f"data_format={data_format!r}; use 'auto', 'text' or 'chat'")
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format={chat_format!r}; use one of {CHAT_FORMATS} or None (the tokenizer's)")
        if packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy={packing_strategy!r}; use one of {PACKING_STRATEGIES}")
        self._check_add_bos(add_bos)
        self.data_format = data_format
        self.messages_field = messages_field
        self.chat_format = chat_format or self.tokenizer.chat_format
        self.pack = pack
        self.split_long = split_long
        self.packing_strategy = packing_strategy
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.max_files = max_files
        self._save_hyperparameters()

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
                    raise ValueError(not_text_message(rec, self.text_field, text))
                texts.append(text)
            encoded = tok.encode_batch(texts)
            bos = [tok.bos_token_id] if self.add_bos else []  # a bos id exists: checked in __init__
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
            warn_data(f"{split}: dropped {dropped} conversations without an assistant turn")
        return docs, labels, origins

    def _report_cut_targets(self, split: str, docs: list[list[int]], labels: list[list[int]] | None) -> None:
        """A document longer than ``max_length`` is cut into pieces (``piece_bounds``), each packed or padded as a
        document of its own: the first token of every continuation piece would be predicted from the previous
        piece, across the cut, so it is no target. Say how many targets that loses (``cut_targets[split]``)."""
        cut = pieces = lost = total = 0
        for d, doc in enumerate(docs):
            lab = doc if labels is None else labels[d]
            # plain text: every token after the first is a target (token ids are never the ignore index)
            total += max(len(doc) - 1, 0) if labels is None else sum(1 for x in lab[1:] if x != IGNORE_INDEX)
            bounds = piece_bounds(len(doc), self.max_length)
            if len(bounds) > 1:
                cut += 1
                pieces += len(bounds)
                lost += sum(1 for s, _ in bounds[1:] if lab[s] != IGNORE_INDEX)
        self.cut_targets = {**getattr(self, "cut_targets", {}), split: lost}
        self._cut_fraction = {**getattr(self, "_cut_fraction", {}), split: lost / total if total else 0.0}
        # a large loss is a warning; a small one (the default data loses 0.4 %) is said in the data summary line
        if lost and lost >= CUT_TARGETS_WARN * total:
            warn_data(
                f"{split}: {cut} documents longer than max_length={self.max_length} were split into {pieces} pieces; "
                f"the first token of each continuation piece is no target (its prefix is in the previous piece), so "
                f"{lost} of {total} targets ({lost / total:.2%}) are not trained or evaluated; raise max_length to "
                "keep them"
            )

    def _summary_extra(self) -> str:
        lost = {s: f for s, f in getattr(self, "_cut_fraction", {}).items() if self.cut_targets.get(s)}
        if not lost:
            return ""
        parts = ", ".join(f"{s} {f:.2%}" for s, f in lost.items())
        return f"; targets lost where long documents were split (first token of each continuation): {parts}"

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
        self._report_cut_targets(split, docs, labels)
        if self.pack:
            rows: PackedRows = pack_documents(
                docs,
                self.max_length,
                self.pad_token_id,
                split_long=self.split_long,
                labels=labels,
                strategy=self.packing_strategy,
            )
            self.efficiency[split] = rows.efficiency
            return rows
        examples = []
        for d, doc in enumerate(docs):
            lab = doc if labels is None else labels[d]
            for s, e in piece_bounds(len(doc), self.max_length):
                examples.append({"input_ids": doc[s:e], "labels": lab[s:e]})
        ds = ExampleDataset(examples)
        self.efficiency[split] = self._padded_efficiency(ds.lengths, self.batch_size)
        return ds

"""Batch collation: dynamic padding, and a batch sampler that groups examples of similar length.

A batch is a plain dict of tensors (see DESIGN.md):

* ``input_ids``       (B, T) long
* ``attention_mask``  (B, T) long, 1 = real token, 0 = padding
* ``position_ids``    (B, T) long
* ``labels``          (B, T) long (causal LM / token classification, -100 = ignore), or
                      (B,) long (single-label classification), (B, L) float (multi-label), (B,) float (regression)
* ``index``           (B,) long, only when examples carry an ``"index"`` (the predict dataloaders): the position of
                      each example in its split, so that predictions can be written back next to their records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, Sampler

from ..conventions import IGNORE_INDEX

__all__ = ["PaddingCollator", "LengthGroupedSampler", "length_grouped_batches", "padding_efficiency", "IGNORE_INDEX"]


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return list(x)


class PaddingCollator:
    """Pad a list of examples to the longest one in the batch and stack them into a batch dict.

    Each example is a dict with ``input_ids`` (list of ints or 1-D tensor) and optionally ``labels``,
    ``attention_mask``, ``position_ids`` and ``index``. What ``labels`` becomes depends on its type:

    * a sequence of ints as long as ``input_ids`` -> token labels (B, T) long, padded with ``label_pad_id``;
    * an int -> (B,) long (single-label classification);
    * a float -> (B,) float (regression);
    * a sequence of floats -> (B, L) float (multi-label targets, e.g. 0./1. per label).

    ``position_ids`` of padded rows: right padding uses ``arange(T)``; left padding uses
    ``cumsum(attention_mask) - 1`` clamped at 0, so the first real token of each row is at position 0. Examples that
    already carry ``position_ids`` (packed rows) keep them and are padded by continuing to count.

    Args:
        pad_token_id: id written into padded ``input_ids`` positions (the tokenizer's pad id).
        padding_side: ``"right"`` (default) or ``"left"`` (for batched generation).
        pad_to_multiple_of: round the padded length T up to a multiple of this (e.g. 8 or 64 for tensor cores).
        label_pad_id: label written on padding (ignored by the loss).

    Examples are not truncated here: the DataModules cut them to ``max_length`` when they build a split.
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        label_pad_id: int = IGNORE_INDEX,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}; use 'right' or 'left'")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of}; use a positive integer or None")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id

    def __repr__(self) -> str:
        return (
            f"PaddingCollator(pad_token_id={self.pad_token_id}, padding_side={self.padding_side!r}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of})"
        )

    def padded_length(self, lengths: Sequence[int]) -> int:
        """The T a batch with these example lengths is padded to."""
        t = max(lengths) if lengths else 0
        if self.pad_to_multiple_of:
            t = math.ceil(t / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return t

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PaddingCollator got an empty list of examples; check the dataset and batch sampler")
        ids = [_as_list(ex["input_ids"]) for ex in examples]
        lengths = [len(x) for x in ids]
        if min(lengths) == 0:
            raise ValueError("an example has no input_ids (0 tokens); drop empty texts before collating")
        B, T = len(ids), self.padded_length(lengths)
        left = self.padding_side == "left"

        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        has_pos = "position_ids" in examples[0]
        position_ids = torch.zeros((B, T), dtype=torch.long)

        first = examples[0].get("labels")
        token_labels = first is not None and not isinstance(first, (int, float)) and _is_token_labels(first, ids[0])
        labels = torch.full((B, T), self.label_pad_id, dtype=torch.long) if token_labels else None

        for i, (ex, row) in enumerate(zip(examples, ids)):
            n = len(row)
            sl = slice(T - n, T) if left else slice(0, n)
            input_ids[i, sl] = torch.tensor(row, dtype=torch.long)
            if "attention_mask" in ex:
                attention_mask[i, sl] = torch.tensor(_as_list(ex["attention_mask"])[:n], dtype=torch.long)
            else:
                attention_mask[i, sl] = 1
            if has_pos:
                pos = _as_list(ex["position_ids"])[:n]
                pad_pos = list(range(T - n))  # padding: its own pseudo-document counting from 0
                position_ids[i] = torch.tensor(pad_pos + pos if left else pos + pad_pos, dtype=torch.long)
            if labels is not None:
                labels[i, sl] = torch.tensor(_as_list(ex["labels"])[:n], dtype=torch.long)

        if not has_pos:
            if left:
                # (B, T): first real token of each row at position 0; padding clamped to 0
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(B, T).clone()

        batch = {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": attention_mask,  # (B, T)
            "position_ids": position_ids,  # (B, T)
        }
        if first is not None:
            batch["labels"] = (
                labels if labels is not None else _stack_sequence_labels([ex["labels"] for ex in examples])
            )
        if "index" in examples[0]:
            batch["index"] = torch.tensor([int(ex["index"]) for ex in examples], dtype=torch.long)  # (B,)
        return batch


def _is_token_labels(labels: Any, ids: list[int]) -> bool:
    """Token labels are ints aligned with input_ids; a sequence of floats is a multi-label target instead."""
    if isinstance(labels, torch.Tensor):
        return not labels.is_floating_point() and labels.dim() == 1
    seq = list(labels)
    return not any(isinstance(v, float) for v in seq)


def _stack_sequence_labels(values: list[Any]) -> torch.Tensor:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return torch.tensor([[float(v) for v in _as_list(x)] for x in values], dtype=torch.float)  # (B, L)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float)  # (B,) regression
    return torch.tensor(values, dtype=torch.long)  # (B,) class index


class LengthGroupedSampler(BatchSampler):
    """A batch sampler that puts examples of similar length in the same batch, so padded batches waste little.

    Indices come from ``sampler`` (random for training, sequential for evaluation; under DDP Lightning swaps in a
    ``DistributedSampler`` through the ``sampler`` argument, so each rank groups its own shard). They are cut into
    mega-batches of ``batch_size * mega_batch_mult`` indices, each mega-batch is sorted by length (longest first) and
    cut into batches, and the batches are shuffled (seeded by ``seed`` and the epoch) when ``shuffle`` is true. The
    longest batch of all is put first, so an out-of-memory shows up at the first step.

    Args:
        sampler: where the indices come from.
        batch_size: examples per batch.
        drop_last: drop the epoch's one short batch (the tail of the last mega-batch), if there is one.
        lengths: the length of every example of the dataset (indexed by dataset index).
        mega_batch_mult: how many batches are sorted together; larger = tighter grouping, less randomness.
        shuffle: shuffle the order of the batches (training); false keeps them in mega-batch order.
        seed: base seed of the batch shuffle (combined with the epoch set by ``set_epoch``).
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        mega_batch_mult: int = 50,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if lengths is None:
            raise ValueError("LengthGroupedSampler needs lengths= (the token count of every example)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; use a positive integer")
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult={mega_batch_mult}; use a positive integer")
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = list(lengths)
        self.mega_batch_mult = mega_batch_mult
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch so each epoch has its own (reproducible) batch order."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        seed = self.seed + self.epoch if self.shuffle else None
        return length_grouped_batches(
            list(iter(self.sampler)), self.lengths, self.batch_size, self.mega_batch_mult, self.drop_last, seed
        )

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        mega = self.batch_size * self.mega_batch_mult
        full_megas, tail = divmod(n, mega)
        count = full_megas * self.mega_batch_mult + math.ceil(tail / self.batch_size)
        if self.drop_last and tail % self.batch_size:
            count -= 1
        return count


def length_grouped_batches(
    indices: Sequence[int],
    lengths: Sequence[int],
    batch_size: int,
    mega_batch_mult: int = 50,
    drop_last: bool = False,
    shuffle_seed: int | None = None,
) -> list[list[int]]:
    """``indices`` cut into batches of similar length (the batch order of :class:`LengthGroupedSampler`).

    Mega-batches of ``batch_size * mega_batch_mult`` indices are sorted by length (longest first) and cut into
    batches; the batches are shuffled with ``shuffle_seed`` (None: kept in order), then the longest batch of all is
    put first. Only the batch made from the tail of the last mega-batch can be short (dropped with ``drop_last``).
    """
    mega = batch_size * mega_batch_mult
    batches: list[list[int]] = []
    for start in range(0, len(indices), mega):
        chunk = sorted(indices[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    # only the batch made from the tail of the last mega-batch can be short
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if not batches:
        return batches
    if shuffle_seed is not None:
        g = torch.Generator()
        g.manual_seed(shuffle_seed)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def padding_efficiency(batches: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None) -> float:
    """Fraction of real tokens when each batch (a list of example lengths) is padded to its longest example."""
    real = total = 0
    for lengths in batches:
        if not lengths:
            continue
        t = max(lengths)
        if pad_to_multiple_of:
            t = math.ceil(t / pad_to_multiple_of) * pad_to_multiple_of
        real += sum(lengths)
        total += t * len(lengths)
    return real / total if total else 0.0

"""Resumable training order: a run resumed from a checkpoint sees exactly the batches the uninterrupted run would.

Three pieces:

* :class:`EpochSampler`: the training order is a pure function of ``(seed, epoch, rank)`` — a seeded permutation
  per epoch (Lightning calls ``set_epoch``), sharded over the data-parallel ranks like ``DistributedSampler`` (it is
  one, so Lightning does not swap it for its own), optionally grouped by length. No global RNG is read.
* :class:`ResumableDataLoader`: counts the batches of the current epoch it has served; ``state_dict()`` (which
  Lightning stores in every checkpoint) records ``(epoch, batches)`` and ``load_state_dict()`` (which Lightning
  calls on a mid-epoch resume) makes the next iteration of that epoch skip those batches by skipping their
  *indices* (nothing is loaded for them). It can also put the global torch RNG back right before its first batch.
* :func:`rows_fingerprint`: a hash of the training rows (every item the loader serves, in index order), stored
  with the position: the position means "batch k of *these* rows", so a resume over other rows (the data files
  edited or reordered in place, another tokenizer file at the same path) is refused instead of going on silently.
* :func:`rng_states` / :func:`set_rng_state`: the global torch RNG (dropout) of every process, gathered into a
  checkpoint and restored per rank.

::

    epoch e, rank r:  randperm(n, seed + e) -> pad to a multiple of the ranks -> every num_replicas-th from r
                      -> (group_by_length: batches of similar length, shuffled, the short one last) -> skip k * B
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .collate import length_grouped_batches
from .warn import warn_data

__all__ = ["EpochSampler", "ResumableDataLoader", "rng_states", "rows_fingerprint", "set_rng_state"]


class EpochSampler(DistributedSampler):
    """This rank's training indices for one epoch, a pure function of ``(seed, epoch, rank)``.

    Args:
        dataset: the training dataset (only its length is read).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        num_replicas: data-parallel processes (1: no sharding).
        rank: this process's data-parallel rank.
        shuffle: permute the indices (true for training).
        batch_size: the loader's batch size (length grouping forms batches of it).
        lengths: token count per example; given, batches hold examples of similar length (``group_by_length``).
        mega_batch_mult: batches sorted together when grouping by length.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        batch_size: int = 1,
        lengths: Sequence[int] | None = None,
        mega_batch_mult: int = 50,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.lengths = list(lengths) if lengths is not None else None
        self.mega_batch_mult = mega_batch_mult
        self._skip = 0

    def epoch_order(self) -> list[int]:
        """This rank's indices of the current epoch, in order (consecutive ``batch_size`` runs are the batches)."""
        shard = list(super().__iter__())  # seeded with seed + epoch, padded, every num_replicas-th from rank
        if self.lengths is None:
            return shard
        seed = self.seed + self.epoch if self.shuffle else None
        batches = length_grouped_batches(shard, self.lengths, self.batch_size, self.mega_batch_mult, False, seed)
        # the one short batch goes last, so that cutting the flat order into batch_size pieces gives these batches
        batches = [b for b in batches if len(b) == self.batch_size] + [b for b in batches if len(b) < self.batch_size]
        return [i for b in batches for i in b]

    def skip_next(self, n: int) -> None:
        """The next iteration starts at index ``n`` of the epoch's order (a resumed epoch)."""
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        skip, self._skip = self._skip, 0
        return iter(order[skip:])


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        # (reshaped: a 0-dim tensor, a user's dataset's label, cannot be viewed as bytes)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, (list, tuple)):
        try:  # a list of token ids / labels: its int64 bytes (4x faster than a tensor; a float or str: repr below)
            ints = array.array("q", value)
        except (TypeError, OverflowError):
            h.update(repr(value).encode())
        else:
            h.update(b"ints%d:" % len(value))
            h.update(ints)
    else:
        h.update(repr(value).encode())


def rows_fingerprint(dataset: Any) -> str:
    """A 16-hex-digit hash of every item of ``dataset`` (key, dtype, shape and values), in index order.

    Rows stored as tensors (:class:`~phi3_lightning.data.packing.PackedRows`: ``input_ids``, ``attention_mask``,
    ``position_ids``, ``labels`` of shape (R, L)) are hashed whole, one pass over their bytes; any other map-style
    dataset item by item."""
    h = hashlib.blake2b(digest_size=8)
    n = len(dataset)
    h.update(b"n%d;" % n)
    fields = ("input_ids", "attention_mask", "position_ids", "labels")
    if all(isinstance(getattr(dataset, f, None), torch.Tensor) for f in fields):
        for f in fields:
            h.update(f.encode())
            _feed(h, getattr(dataset, f))
        return h.hexdigest()
    for i in range(n):
        item = dataset[i]
        if isinstance(item, dict):
            for key in sorted(item):
                h.update(str(key).encode())
                _feed(h, item[key])
        else:
            _feed(h, item)
    return h.hexdigest()


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position in the epoch travels in the checkpoint (Lightning's stateful loaders).

    ``state_dict()`` = the epoch and the batches of it served so far (plus what must match for the position to mean
    the same batches); after ``load_state_dict()`` the next iteration over that epoch starts at the next batch.
    ``rng_to_restore`` (a state from :func:`rng_states`), when set, is put back right before the first batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._served = 0
        self._resume_at: tuple[int, int] | None = None
        self._rows: str | None = None  # rows_fingerprint of the dataset, computed once (the rows never change)
        self.rng_to_restore: dict[str, Any] | None = None

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def _facts(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "seed": getattr(s, "seed", None),
            "num_samples": len(self.dataset),  # type: ignore[arg-type]
            "batch_size": self.batch_size,
            "num_replicas": getattr(s, "num_replicas", 1),
            "group_by_length": getattr(s, "lengths", None) is not None,
            "rows": self._rows_fingerprint(),
        }

    def _rows_fingerprint(self) -> str:
        if self._rows is None:
            self._rows = rows_fingerprint(self.dataset)
        return self._rows

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._served, **self._facts()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._facts()
        for key in ("seed", "num_samples", "batch_size", "group_by_length"):
            if key in state and state[key] != mine[key]:
                name = {"num_samples": "training examples"}.get(key, key)
                raise ValueError(
                    f"cannot resume the training data order: the checkpoint's {name} was {state[key]!r}, this run's "
                    f"is {mine[key]!r}; resume with the same --data settings (seed, batch_size, files, max_length, "
                    "group_by_length), or start a new run from the weights instead of --ckpt_path"
                )
        if "rows" in state and state["rows"] != mine["rows"]:  # checkpoints before the fingerprint have none
            raise ValueError(
                f"cannot resume the training data order: the training rows differ from the checkpoint's (fingerprint "
                f"{state['rows']} there, {mine['rows']} here) although their number ({mine['num_samples']}) and the "
                "settings are the same: the data files were edited or reordered, or the tokenizer file changed, since "
                "the checkpoint was written, so its position in the epoch would point into other rows. Restore the "
                "data and tokenizer it was trained on, or train on the new data as a new run from its weights: "
                "python -m phi3_lightning export --checkpoint CKPT --output DIR, then fit --model.init_args.model "
                "DIR without --ckpt_path"
            )
        if state.get("num_replicas", 1) != mine["num_replicas"]:
            warn_data(
                f"the checkpoint was written by {state.get('num_replicas')} data-parallel processes, this run has "
                f"{mine['num_replicas']}: the interrupted epoch restarts from its first batch (not an exact resume)"
            )
            return
        self._resume_at = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._serve()

    def _serve(self) -> Iterator[Any]:
        self._rows_fingerprint()  # now, not in the first checkpoint save (that may be a preemption's, on a deadline)
        epoch = self._sampler_epoch()
        skip = 0
        if self._resume_at is not None:
            at_epoch, served = self._resume_at
            self._resume_at = None
            if at_epoch == epoch:
                skip = served
        if skip and not isinstance(self.sampler, EpochSampler):
            warn_data(
                f"the train loader's sampler ({type(self.sampler).__name__}) was replaced, so the resumed epoch cannot "
                f"skip the {skip} batches already trained on; it restarts from its first batch"
            )
            skip = 0
        if skip:
            self.sampler.skip_next(skip * self.batch_size)  # type: ignore[union-attr]
        self._epoch, self._served = epoch, skip
        for batch in super().__iter__():
            if self.rng_to_restore is not None:
                set_rng_state(self.rng_to_restore)
                self.rng_to_restore = None
            self._served += 1
            yield batch


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_states() -> list[dict[str, Any]]:
    """The global torch RNG state (CPU, and CUDA when in use) of every process, in rank order.

    Collective under torch.distributed: every rank must call it (Lightning builds checkpoints on every rank).
    """
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    _, world = _rank()
    if world == 1:
        return [state]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, state)
    return [{k: (v if k == "cpu" else list(v)) for k, v in s.items()} for s in gathered]


def rank_state(states: list[dict[str, Any]]) -> dict[str, Any] | None:
    """This process's entry of :func:`rng_states` (None, with a warning, when the number of processes changed)."""
    rank, world = _rank()
    if len(states) != world:
        warn_data(
            f"the checkpoint holds the RNG state of {len(states)} processes, this run has {world}: dropout "
            "continues from a fresh RNG state (not an exact resume)"
        )
        return None
    return states[rank]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

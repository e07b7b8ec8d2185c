"""Real-token fraction (efficiency) of padding, length-grouped padding and packing, for token lengths of a corpus.

``python -m phi3_lightning.data.report`` prints it for the embedded corpora.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import RandomSampler

from .collate import LengthGroupedSampler, padding_efficiency
from .packing import packing_efficiency, piece_bounds

__all__ = ["efficiency_report"]


def efficiency_report(
    lengths: Sequence[int],
    max_length: int = 256,
    batch_size: int = 8,
    pad_to_multiple_of: int | None = None,
    mega_batch_mult: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """Real-token fraction of batching documents of these token ``lengths`` four ways.

    Returns ``{"padding", "grouped", "packed", "packed_seq"}`` (fractions in (0, 1]) plus ``"tokens"`` and
    ``"examples"`` (pieces of at most ``max_length`` tokens).
    """
    for value, name in ((max_length, "max_length"), (batch_size, "batch_size"), (mega_batch_mult, "mega_batch_mult")):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; use a positive integer")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}; use a positive integer, or None for no rounding")
    pieces = [e - s for n in lengths for s, e in piece_bounds(n, max_length)]  # token count of every piece
    if not pieces:
        raise ValueError("efficiency_report got no tokens (all lengths are 0); pass the token lengths of a corpus")
    g = torch.Generator()
    g.manual_seed(seed)
    order = torch.randperm(len(pieces), generator=g).tolist()
    random_batches = [[pieces[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
    g.manual_seed(seed)
    grouped = LengthGroupedSampler(
        RandomSampler(range(len(pieces)), generator=g),
        batch_size,
        lengths=pieces,
        mega_batch_mult=mega_batch_mult,
        seed=seed,
    )
    grouped_batches = [[pieces[i] for i in b] for b in grouped]
    return {
        "padding": padding_efficiency(random_batches, pad_to_multiple_of),
        "grouped": padding_efficiency(grouped_batches, pad_to_multiple_of),
        "packed": packing_efficiency(pieces, max_length, strategy="best_fit"),
        "packed_seq": packing_efficiency(pieces, max_length, strategy="sequential"),
        "tokens": float(sum(pieces)),
        "examples": float(len(pieces)),
    }

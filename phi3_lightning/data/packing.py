r"""Packing: several documents per fixed-length row, with ``position_ids`` restarting at every document.

Why: padding every document to the longest in its batch wastes compute on pad tokens; packing fills each row of
``row_length`` tokens with whole documents (or pieces of long ones), so nearly every token is real.

The one boundary signal is ``position_ids``: it restarts at 0 at the first token of every document and counts up by
one inside it. The model derives its attention mask from it (eager/sdpa: block-diagonal causal mask; flash:
``cu_seqlens``; flex: a block mask), so no token attends to another document. A row holding documents A (3 tokens),
B (2 tokens), C (2 tokens) and one padding token, and the mask the model builds from it (``x`` = may attend)::

    tokens          a0 a1 a2 b0 b1 c0 c1 <pad>
    position_ids     0  1  2  0  1  0  1  0       <- restarts mark document starts; the pad tail is its own segment
    attention_mask   1  1  1  1  1  1  1  0
    labels        -100 a1 a2 -100 b1 -100 c1 -100 <- -100 at every document's first token and on padding

                  keys: a0 a1 a2 b0 b1 c0 c1 pad
    query a0            x  .  .  .  .  .  .  .
    query a1            x  x  .  .  .  .  .  .
    query a2            x  x  x  .  .  .  .  .
    query b0            .  .  .  x  .  .  .  .
    query b1            .  .  .  x  x  .  .  .
    query c0            .  .  .  .  .  x  .  .
    query c1            .  .  .  .  .  x  x  .
    query pad           .  .  .  .  .  .  .  x    (masked out of the loss; attends only to itself)

Labels are NOT shifted here: ``labels[t]`` is ``input_ids[t]`` (or -100) and the model's causal-LM head shifts, i.e.
the logits at position t are scored against ``labels[t + 1]``. So the label at a document's first token (b0, c0
above) is the target of the *previous* document's last token (a2, b1); it is -100, and no prediction crosses a
document boundary. Likewise the first padding label is -100, so the last real token of a row predicts nothing. Each
document, packed or run alone, has the same set of counted (position, target) pairs: its tokens 1..n-1 predicted from
their prefix. That is what makes the packed loss equal the token-weighted loss of the documents run one by one.

The padding tail of a row that cannot be filled has ``input_ids = pad_token_id``, ``attention_mask = 0``,
``labels = -100`` and ``position_ids`` 0, 1, 2, … as a pseudo-document of its own.

Documents longer than ``row_length`` are split into ``row_length``-token pieces (``split_long=True``; each piece is
packed as a document of its own, so its first label is -100 too) or rejected with a ``ValueError``
(``split_long=False``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .collate import IGNORE_INDEX

__all__ = ["PackedRows", "pack_documents", "plan_packing", "packing_efficiency", "piece_bounds", "PACKING_STRATEGIES"]

PACKING_STRATEGIES = ("best_fit", "sequential")

# a packed piece of a document: (document index, start token, end token)
Piece = tuple[int, int, int]


@dataclass
class PackedRows:
    """The rows made by :func:`pack_documents`, usable directly as a map-style ``Dataset``.

    ``rows[i]`` is a dict of 1-D tensors ``input_ids``, ``attention_mask``, ``position_ids``, ``labels`` (each
    ``row_length`` long); ``torch.utils.data.default_collate`` (or :class:`PaddingCollator`) stacks them into a batch.
    """

    input_ids: torch.Tensor  # (R, L) long
    attention_mask: torch.Tensor  # (R, L) long, 1 = real token
    position_ids: torch.Tensor  # (R, L) long, restart at 0 at every document start (and at the padding tail)
    labels: torch.Tensor  # (R, L) long, -100 at document starts and on padding
    pieces: list[list[Piece]] = field(repr=False)  # per row: (doc index, start, end) of every packed piece
    row_length: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "position_ids": self.position_ids[i],
            "labels": self.labels[i],
        }

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def efficiency(self) -> float:
        """Fraction of the R * L token slots that hold real tokens."""
        total = self.input_ids.numel()
        return self.num_real_tokens / total if total else 0.0


def piece_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """The one rule for cutting a document of ``length`` tokens into pieces of at most ``size``: consecutive
    ``(start, end)`` spans, all full but the last; ``[]`` for an empty document. Packing, the unpacked causal-LM
    examples and the efficiency report all cut documents with it."""
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def _pieces_of(lengths: Sequence[int], row_length: int, split_long: bool) -> list[Piece]:
    pieces: list[Piece] = []
    for d, n in enumerate(lengths):
        if n > row_length and not split_long:
            raise ValueError(
                f"document {d} has {n} tokens, more than the row length {row_length}; raise the row length "
                "(max_length) or set split_long=True to split long documents into pieces"
            )
        pieces.extend((d, s, e) for s, e in piece_bounds(n, row_length))
    return pieces


def plan_packing(
    lengths: Sequence[int], row_length: int, split_long: bool = True, strategy: str = "best_fit"
) -> list[list[Piece]]:
    """Decide which (piece of which) document goes into which row, from document lengths only.

    ``strategy``:
      * ``"best_fit"`` (default): best-fit decreasing. Pieces are taken longest first and each goes into the row
        with the least room that still fits it; nearly optimal fill.
      * ``"sequential"``: next-fit in the given order: a row is closed when the next piece does not fit. Keeps
        documents in order (streams), fills a little less.

    Returns, per row, its pieces ``(doc index, start, end)`` in the order they are laid out. Empty documents are
    skipped.
    """
    if row_length < 1:
        raise ValueError(f"row_length={row_length}; use a positive number of tokens per row")
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing strategy {strategy!r} is unknown; use one of {PACKING_STRATEGIES}")
    pieces = _pieces_of(lengths, row_length, split_long)
    rows: list[list[Piece]] = []
    if strategy == "sequential":
        room = 0
        for p in pieces:
            n = p[2] - p[1]
            if not rows or n > room:
                rows.append([])
                room = row_length
            rows[-1].append(p)
            room -= n
        return rows

    # best-fit decreasing; `free` is a sorted list of (room left, row index) for rows that still have room
    order = sorted(range(len(pieces)), key=lambda k: (-(pieces[k][2] - pieces[k][1]), k))
    free: list[tuple[int, int]] = []
    for k in order:
        p = pieces[k]
        n = p[2] - p[1]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = row_length, len(rows)
            rows.append([])
        rows[r].append(p)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def pack_documents(
    docs: Sequence[Sequence[int]],
    row_length: int,
    pad_token_id: int,
    split_long: bool = True,
    labels: Sequence[Sequence[int]] | None = None,
    strategy: str = "best_fit",
) -> PackedRows:
    """Pack token-id documents into rows of exactly ``row_length`` tokens (see the module docstring for the layout).

    Args:
        docs: the documents, each a list of token ids (add an eos to each beforehand if the model should learn to
            end documents).
        row_length: tokens per row (the training sequence length).
        pad_token_id: id of the padding that fills the tail of rows that cannot be filled.
        split_long: split documents longer than ``row_length`` into pieces (true) or raise ``ValueError`` (false).
        labels: per-document labels aligned with ``docs`` (e.g. -100 outside assistant turns of a chat); default:
            the ids themselves. Either way the label at every piece's first token is set to -100.
        strategy: ``"best_fit"`` or ``"sequential"`` (see :func:`plan_packing`).
    """
    lengths = [len(d) for d in docs]
    if labels is not None:
        if len(labels) != len(docs):
            raise ValueError(f"got {len(labels)} label lists for {len(docs)} documents; pass one per document")
        for d, (doc, lab) in enumerate(zip(docs, labels)):
            if len(lab) != len(doc):
                raise ValueError(
                    f"document {d} has {len(doc)} tokens but {len(lab)} labels; labels must align with the tokens"
                )
    if sum(lengths) == 0:
        raise ValueError(
            f"nothing to pack: {len(docs)} documents with 0 tokens in all; check the data source and text field"
        )
    plan = plan_packing(lengths, row_length, split_long=split_long, strategy=strategy)

    R, L = len(plan), row_length
    input_ids = torch.full((R, L), pad_token_id, dtype=torch.long)  # (R, L)
    attention_mask = torch.zeros((R, L), dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    out_labels = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    docs_t = [torch.as_tensor(d, dtype=torch.long) for d in docs]
    labels_t = docs_t if labels is None else [torch.as_tensor(lab, dtype=torch.long) for lab in labels]
    arange = torch.arange(L, dtype=torch.long)

    for r, row in enumerate(plan):
        t = 0
        for d, s, e in row:
            n = e - s
            input_ids[r, t : t + n] = docs_t[d][s:e]
            out_labels[r, t : t + n] = labels_t[d][s:e]
            out_labels[r, t] = IGNORE_INDEX  # the previous token's target would cross the boundary
            position_ids[r, t : t + n] = arange[:n]
            attention_mask[r, t : t + n] = 1
            t += n
        position_ids[r, t:] = arange[: L - t]  # padding tail: its own pseudo-document
    return PackedRows(input_ids, attention_mask, position_ids, out_labels, plan, row_length)


def packing_efficiency(
    packed: PackedRows | Sequence[int],
    row_length: int | None = None,
    split_long: bool = True,
    strategy: str = "best_fit",
) -> float:
    """Fraction of real tokens: of a :class:`PackedRows`, or of packing documents with these lengths into rows."""
    if isinstance(packed, PackedRows):
        return packed.efficiency
    if row_length is None:
        raise ValueError("packing_efficiency(lengths, ...) needs row_length=")
    plan = plan_packing(packed, row_length, split_long=split_long, strategy=strategy)
    real = sum(e - s for row in plan for _, s, e in row)
    return real / (len(plan) * row_length) if plan else 0.0

"""Who may attend to whom, computed once per batch and shared by every layer.

The rule, identical in every backend: query q (absolute index ``offset + i``) sees key k iff

    k <= q                         causal
    k >  q - w                     sliding window w (when configured)
    key k is real                  attention_mask[b, k] == 1
    doc(q) == doc(k)               same document of a packed row (only without a KV cache)

and always itself (so a padding query never has an empty row: no NaN in outputs or gradients).

Documents come from ``position_ids`` alone: a new document starts wherever the position does not continue the
previous one (``pos[t] != pos[t-1] + 1``), which includes every restart at 0. Left-padded rows produced by
``cumsum(attention_mask) - 1`` make each pad its own one-token document, which changes nothing for real tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids -> (B, T) int32 document index, 0-based within each row."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.cumsum(-1, dtype=torch.int32) - 1


def has_document_restarts(position_ids: torch.Tensor) -> bool:
    """True if any row holds more than one document (one host sync; done once per batch)."""
    if position_ids.shape[-1] < 2:
        return False
    return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())


@dataclass
class AttentionContext:
    """Everything a backend needs about the mask for one forward, built once by the backbone.

    Only the pieces a backend asks for are materialised (``bool_mask`` for eager/sdpa, varlen metadata for
    flash, a block mask for flex); they are cached on the context, so all layers share them.
    """

    batch_size: int
    q_len: int
    kv_len: int  # keys visible to this forward (cache included), after ``k_start``
    offset: int  # absolute index of the first query
    k_start: int  # keys before this absolute index are invisible to every query (window); sliced off
    sliding_window: int | None
    key_padding: torch.Tensor | None  # (B, k_start + kv_len) bool, True = real token; None = all real
    doc_ids: torch.Tensor | None  # (B, T) int32 document index; None = one document per row
    device: torch.device
    cache: dict[str, Any] = field(default_factory=dict)
    # the backend's kernel (``Backend.attend``), set by the backbone for this forward; every layer calls it
    attend: Callable[..., torch.Tensor] | None = None

    @property
    def is_plain_causal(self) -> bool:
        """True when ``is_causal`` alone is exact: no padding, no documents, window inactive, no cache offset."""
        window_inactive = self.sliding_window is None or self.kv_len <= self.sliding_window
        return (
            self.key_padding is None
            and self.doc_ids is None
            and window_inactive
            and self.offset == 0
            and self.k_start == 0
            and self.q_len == self.kv_len
        )

    @property
    def by_document(self) -> bool:
        """Packed or padded rows without a cache: SDPA runs each document (a run of real tokens) as its own causal
        sequence instead of one dense (T, T) mask; padding costs no attention work."""
        return (
            (self.doc_ids is not None or self.key_padding is not None)
            and self.offset == 0
            and self.q_len == self.kv_len
        )

    @property
    def mask_free(self) -> bool:
        """True for a one-token decode step with no padding: every visible key is allowed (the window is
        already applied by slicing keys from ``k_start``)."""
        return self.q_len == 1 and self.key_padding is None and self.doc_ids is None

    def bool_mask(self) -> torch.Tensor | None:
        """(B, 1, Tq, Tk) bool, True = attend; None when plain causal (backends use is_causal) or mask-free."""
        if "bool" in self.cache:
            return self.cache["bool"]
        if self.is_plain_causal or self.mask_free:
            self.cache["bool"] = None
            return None
        dev = self.device
        q_abs = torch.arange(self.offset, self.offset + self.q_len, device=dev)[:, None]  # (Tq, 1)
        k_abs = torch.arange(self.k_start, self.k_start + self.kv_len, device=dev)[None, :]  # (1, Tk)
        allowed = k_abs <= q_abs
        if self.sliding_window is not None:
            allowed = allowed & (k_abs > q_abs - self.sliding_window)
        allowed = allowed[None].expand(self.batch_size, -1, -1)  # (B, Tq, Tk)
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, self.k_start :]
        if self.doc_ids is not None:  # no cache: q and k index the same row
            allowed = allowed & (self.doc_ids[:, :, None] == self.doc_ids[:, None, :])
        allowed = allowed | (k_abs == q_abs)[None]
        mask = allowed[:, None]  # (B, 1, Tq, Tk)
        self.cache["bool"] = mask
        return mask

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, 1, Tq, Tk) float: 0 where allowed, dtype's most negative value elsewhere (as transformers)."""
        key = ("add", dtype)
        if key not in self.cache:
            m = self.bool_mask()
            if m is None and self.mask_free:
                self.cache[key] = None
                return None
            if m is None:  # plain causal still needs the triangle in eager
                q = torch.arange(self.q_len, device=self.device)[:, None]
                k = torch.arange(self.kv_len, device=self.device)[None, :]
                m = (k <= q)[None, None]
            zero = torch.zeros((), dtype=dtype, device=self.device)
            self.cache[key] = torch.where(m, zero, torch.finfo(dtype).min)
        return self.cache[key]


def build_context(
    *,
    batch_size: int,
    q_len: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    past_len: int,
    sliding_window: int | None,
    derive_documents: bool,
    device: torch.device,
) -> AttentionContext:
    """Build the per-batch attention context.

    ``attention_mask`` (B, past_len + q_len) marks real tokens (1) and padding (0) over the whole sequence,
    including cached keys. ``derive_documents`` is False while decoding with a cache.
    """
    key_padding = None
    if attention_mask is not None:
        total = past_len + q_len
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not fit the batch: pass one row per "
                f"sequence, shape (batch, cache + new tokens) = ({batch_size}, {total}), 1 = real token, 0 = padding"
            )
        if attention_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} columns but the sequence (cache {past_len} + "
                f"new {q_len}) has {total}; pass a mask covering cached and new tokens"
            )
        key_padding = attention_mask.bool()
        if bool(key_padding.all()):
            key_padding = None
    doc_ids = None
    if derive_documents and past_len == 0 and has_document_restarts(position_ids):
        doc_ids = document_ids(position_ids)
    k_start = 0
    if sliding_window is not None and past_len > 0:
        k_start = max(0, past_len - sliding_window + 1)
    return AttentionContext(
        batch_size=batch_size,
        q_len=q_len,
        kv_len=past_len + q_len - k_start,
        offset=past_len,
        k_start=k_start,
        sliding_window=sliding_window,
        key_padding=key_padding,
        doc_ids=doc_ids,
        device=device,
    )

"""Packed and padded rows without a dense (T, T) mask: attention run document by document.

For a packed row, a dense block-diagonal mask makes SDPA do (and, on CPU, materialise) all T x T scores, most of
them masked; a padded row wastes the scores of its padding. Running each document (a run of real tokens with one
document id) as its own causal sequence does only sum(L_i^2) work and lets SDPA use its fused causal kernel. This
is the SDPA backend's path for packed or padded batches without a KV cache; flash's varlen kernel does the same in
one launch. Padding positions get a zero attention output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masking import AttentionContext


def _segments(ctx: AttentionContext) -> tuple[torch.Tensor, list[int]]:
    from .backends import _varlen_metadata

    meta = _varlen_metadata(ctx)
    if "bounds" not in meta:
        meta["bounds"] = meta["cu_seqlens"].tolist()  # one host sync per batch, shared by all layers
    return meta["indices"], meta["bounds"]


def sdpa_by_document(q, k, v, ctx: AttentionContext, scale: float, dropout_p: float) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, H, T, D) with kv heads already repeated -> (B, T, H, D); padding rows are 0."""
    b, h, t, d = q.shape
    idx, bounds = _segments(ctx)
    flat = [x.transpose(1, 2).reshape(b * t, h, d).index_select(0, idx) for x in (q, k, v)]  # (N, H, D) each
    w = ctx.sliding_window
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in flat)  # (1, H, L, D)
        n = e - s
        mask = None
        if w is not None and n > w:
            i = torch.arange(n, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=mask is None and n > 1, scale=scale)
        outs.append(o[0].transpose(0, 1))  # (L, H, D)
    out_u = torch.cat(outs) if outs else flat[0]
    return out_u.new_zeros(b * t, h, d).index_copy(0, idx, out_u).view(b, t, h, d)

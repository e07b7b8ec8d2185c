"""Packed and padded rows without a dense (T, T) mask: attention run document by document.

For a packed row, a dense block-diagonal mask makes SDPA do (and, on CPU, materialise) all T x T scores, most of
them masked; a padded row wastes the scores of its padding. Running each document (a run of real tokens with one
document id) as its own causal sequence does only sum(L_i^2) work and lets SDPA use its fused causal kernel. This
is the SDPA backend's path for packed or padded batches without a KV cache; flash's varlen kernel does the same in
one launch. Padding positions get a zero attention output.

Many short documents would mean many small SDPA calls (a packed row of 1024 tokens of 40-token lines: ~25 calls
per row per layer, each paying a fixed dispatch cost forward and backward). So documents are grouped by length:
those whose lengths share the same power-of-two ceiling go into one (n, L, H, D) batch, each right-padded to the
group's longest length L, and run in one causal SDPA call. That is exact: under the causal (and window) mask a
real query only sees keys at or before it, never the padding after its document, and the padding queries' outputs
are dropped (so they receive no gradient). The work stays within 4x of sum(L_i^2) (at most 2x each length) and the
number of calls is at most log2(T) + 1 per layer. The gather / scatter indices are built once per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masking import AttentionContext


def varlen_metadata(ctx: AttentionContext) -> dict:
    """Token indices of real tokens and cu_seqlens of the (document, row) segments, once per batch (cached on
    ``ctx``): the flash backend's varlen kernel and the SDPA by-document path below both read it."""
    if "varlen" in ctx.cache:
        return ctx.cache["varlen"]
    b, t = ctx.batch_size, ctx.q_len
    valid = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, t, dtype=torch.bool, device=ctx.device)
    docs = ctx.doc_ids if ctx.doc_ids is not None else torch.zeros(b, t, dtype=torch.int32, device=ctx.device)
    seg_key = (torch.arange(b, device=ctx.device)[:, None] * (t + 1) + docs).flatten()  # (B*T,)
    indices = valid.flatten().nonzero().squeeze(-1)  # (N,)
    keys = seg_key[indices]
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    start_pos = starts.nonzero().squeeze(-1)
    cu = torch.cat([start_pos, start_pos.new_tensor([indices.numel()])]).to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    meta = {"indices": indices, "cu_seqlens": cu, "max_seqlen": int(lengths.max()) if lengths.numel() else 0}
    ctx.cache["varlen"] = meta
    return meta


def document_buckets(ctx: AttentionContext, device: torch.device) -> tuple[list[tuple], torch.Tensor, torch.Tensor]:
    """Once per batch: per length group (n docs, padded length L, gather index into the real tokens + one zero row,
    rows of the (n * L) layout that are real); the real tokens' positions in the (B * T) layout; and where the
    concatenated real rows of all groups go in that layout."""
    meta = varlen_metadata(ctx)
    if "buckets" in meta:
        return meta["buckets"]
    idx = meta["indices"]
    bounds = meta["cu_seqlens"].tolist()  # one host sync per batch, shared by all layers
    n_real = bounds[-1]
    groups: dict[int, list[int]] = {}
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        groups.setdefault((e - s - 1).bit_length(), []).append(i)  # ceil(log2(length))
    out, dests = [], []
    for key in sorted(groups):
        docs = groups[key]
        starts = torch.tensor([bounds[i] for i in docs])
        lens = torch.tensor([bounds[i + 1] - bounds[i] for i in docs])
        length = int(lens.max())
        ar = torch.arange(length)
        real = ar[None, :] < lens[:, None]  # (n, L)
        gather = torch.where(real, starts[:, None] + ar[None, :], n_real).flatten()  # n_real: the zero row
        real_rows = real.flatten().nonzero().squeeze(-1)
        dests.append(gather[real_rows])  # positions among the real tokens
        out.append((len(docs), length, gather.to(device), real_rows.to(device)))
    dest = torch.cat(dests).to(device) if dests else torch.zeros(0, dtype=torch.long, device=device)
    meta["buckets"] = (out, idx, idx.index_select(0, dest))  # final positions in the (B * T) layout
    return meta["buckets"]


def sdpa_by_document(q, k, v, ctx: AttentionContext, scale: float, dropout_p: float) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, H, T, D) with kv heads already repeated -> (B, T, H, D); padding rows are 0."""
    b, h, t, d = q.shape
    groups, idx, dest = document_buckets(ctx, q.device)
    # real tokens in document order, plus one zero row that the padding of every group points at
    flat = [
        torch.cat([x.transpose(1, 2).reshape(b * t, h, d).index_select(0, idx), x.new_zeros(1, h, d)])
        for x in (q, k, v)
    ]
    w = ctx.sliding_window
    outs = []
    for n, length, gather, real_rows in groups:
        qs, ks, vs = (x.index_select(0, gather).view(n, length, h, d).transpose(1, 2) for x in flat)  # (n, H, L, D)
        mask = None
        if w is not None and length > w:
            i = torch.arange(length, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and length > 1, scale=scale
        )
        outs.append(o.transpose(1, 2).reshape(n * length, h, d).index_select(0, real_rows))  # (n_real, H, D)
    if not outs:
        return q.new_zeros(b, t, h, d)
    return outs[0].new_zeros(b * t, h, d).index_copy(0, dest, torch.cat(outs)).view(b, t, h, d)


# Under torch.compile the by-document path runs outside the graph: its length groups are Python-level structure that
# changes with every packing layout, so a compiled layer tracing them would recompile per batch (until dynamo's cache
# limit, after which the whole layer runs eagerly). Outside, the layer's graph breaks around attention once and is
# built once; the SDPA calls inside are large fused kernels either way (tests/model/test_compile_layouts.py).
_outside_graphs: dict[str, object] = {}


def sdpa_by_document_outside_graphs():
    """:func:`sdpa_by_document` wrapped in ``torch.compiler.disable``, made on first need (importing torch._dynamo
    costs about a second, which a model used without compile should not pay at import)."""
    fn = _outside_graphs.get("by_document")
    if fn is None:
        fn = _outside_graphs["by_document"] = torch.compiler.disable(sdpa_by_document)
    return fn

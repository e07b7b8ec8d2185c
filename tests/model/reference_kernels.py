"""Pure-torch stand-ins for flash-attn's two kernels (same signatures, fp32 math), for tests only.

``set_flash_kernels((reference_flash_attn_func, reference_flash_attn_varlen_func))`` runs the flash backend's
unpad / varlen glue on CPU; its numbers are then these kernels', not flash-attn's.
"""

from __future__ import annotations

import math

import torch


def _reference_core(q, k, v, scale, causal, window_size, q_offset: int = 0):
    """q (Tq, H, D), k/v (Tk, Hkv, D) -> (Tq, H, D), flash semantics, fp32 math."""
    tq, tk = q.shape[0], k.shape[0]
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    qi = torch.arange(tq, device=q.device)[:, None] + (tk - tq)  # flash aligns the bottom-right corner
    ki = torch.arange(tk, device=q.device)[None, :]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= ki <= qi
    left, right = window_size
    if left >= 0:
        allowed &= ki >= qi - left
    if right >= 0 and not causal:
        allowed &= ki <= qi + right
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)


def reference_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """Pure-torch stand-in with ``flash_attn_func``'s signature: q (B, T, H, D), k/v (B, T, Hkv, D)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.stack([_reference_core(q[i], k[i], v[i], scale, causal, window_size) for i in range(q.shape[0])])


def reference_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
):
    """Pure-torch stand-in with ``flash_attn_varlen_func``'s signature: q (N, H, D) packed along N."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        out[qs:qe] = _reference_core(q[qs:qe], k[ks:ke], v[ks:ke], scale, causal, window_size)
    return out

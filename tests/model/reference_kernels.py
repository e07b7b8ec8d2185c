"""Pure-torch stand-ins for flash-attn's two kernels and torch's ``varlen_attn`` (same signatures, fp32 math), for
tests only.

``set_flash_kernels((reference_flash_attn_func, reference_flash_attn_varlen_func))`` runs the flash backend's
unpad / varlen glue on CPU; ``set_flash_kernels(torch_varlen=reference_torch_varlen_attn)`` runs its torch-varlen
glue (``older_torch_varlen_attn(...)`` emulates the signatures of older torch releases). The numbers are then these
kernels', not the real ones'.
"""

from __future__ import annotations

import inspect
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


def _varlen_loop(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal, window_size):
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    out = torch.empty_like(query)
    for i in range(cu_seq_q.numel() - 1):
        qs, qe = int(cu_seq_q[i]), int(cu_seq_q[i + 1])
        ks, ke = int(cu_seq_k[i]), int(cu_seq_k[i + 1])
        assert qe - qs <= max_q and ke - ks <= max_k
        out[qs:qe] = _reference_core(query[qs:qe], key[ks:ke], value[ks:ke], scale, causal, window_size)
    return out


def _check_heads(query, key, enable_gqa):
    hq, hkv = query.shape[1], key.shape[1]
    if not enable_gqa and hq != hkv:  # as torch's varlen_attn
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={hq} and Hkv={hkv}")
    if enable_gqa and hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")


def reference_torch_varlen_attn(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """Pure-torch stand-in with ``torch.nn.attention.varlen.varlen_attn``'s signature (torch 2.12+): q (Tq, H, D),
    k/v (Tk, Hkv, D) packed along T. As torch: causal iff ``window_size == (-1, 0)`` (a tuple), else the flash
    window (left, right): key k visible iff q - left <= k <= q + right (-1: unbounded); no dropout."""
    assert return_aux is None and seqused_k is None and block_table is None
    _check_heads(query, key, enable_gqa)
    causal = window_size == (-1, 0)
    return _varlen_loop(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal, tuple(window_size))


def older_torch_varlen_attn(*, window_size: bool = True, enable_gqa: bool = True, scale: bool = True):
    """A stand-in whose signature lacks the parameters an older torch's ``varlen_attn`` lacks (the backend reads the
    signature): ``window_size=False`` without ``scale`` is torch 2.10's ``(..., max_k, is_causal=False,
    return_aux=None)``; ``enable_gqa=False`` alone is ``(..., *, return_aux=None, scale=None, window_size=(-1, -1))``.
    Calls record their keyword arguments in ``fn.calls``."""
    calls = []

    def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *args, **kwargs):
        bound = sig.bind(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *args, **kwargs)  # TypeError if unknown
        bound.apply_defaults()
        a = bound.arguments
        calls.append({n: a[n] for n in ("is_causal", "window_size", "enable_gqa", "scale") if n in a})
        _check_heads(query, key, a.get("enable_gqa", False))
        if "window_size" in a:
            causal, win = a["window_size"] == (-1, 0), tuple(a["window_size"])
        else:
            causal, win = a["is_causal"], (-1, -1)
        return _varlen_loop(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, a.get("scale"), causal, win)

    full = inspect.signature(reference_torch_varlen_attn).parameters
    keep = [p for n, p in full.items() if n not in ("seqused_k", "block_table", "num_splits")]
    keep = [p for p in keep if (window_size or p.name != "window_size") and (enable_gqa or p.name != "enable_gqa")]
    keep = [p for p in keep if scale or p.name != "scale"]
    if not window_size:  # torch 2.10: is_causal positional after max_k
        kw = [p for p in keep if p.kind is inspect.Parameter.KEYWORD_ONLY]
        pos = [p for p in keep if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        causal = inspect.Parameter("is_causal", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False)
        keep = pos + [causal] + [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in kw]
    sig = inspect.Signature(keep)
    fn.__signature__ = sig
    fn.calls = calls
    return fn

"""Attention backends behind one switch: eager, sdpa, flash_attention_2, flex.

Every backend takes q (B, H, Tq, D), k and v (B, Hkv, Tk, D) (GQA: H is a multiple of Hkv) and an
:class:`~phi3_lightning.model.masking.AttentionContext`, and returns (B, Tq, H, D). They implement the same
mask rule (see ``masking.py``); only the representation differs:

- eager: an additive float mask and an fp32 softmax (the reference);
- sdpa: ``scaled_dot_product_attention`` with a boolean mask, or ``is_causal=True`` when that is exact;
- flash_attention_2: ``flash_attn_func`` for full rows, ``flash_attn_varlen_func`` with ``cu_seqlens`` for padded or
  packed batches (padding removed, documents as separate sequences), ``window_size=(w-1, w-1)``;
- flex: ``flex_attention`` with one block mask (causal & window & padding & document).

Cached decode steps (a KV cache with earlier tokens) run through SDPA in the flash and flex backends.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from .masking import AttentionContext

BACKENDS = ("eager", "sdpa", "flash_attention_2", "flex")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D), each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


# ----------------------------------------------------------------------------- eager
def eager_attention(q, k, v, ctx: AttentionContext, scale: float, dropout_p: float) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, Tq, Tk)
    mask = ctx.additive_mask(scores.dtype)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v)  # (B, H, Tq, D)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- sdpa
def sdpa_attention(q, k, v, ctx: AttentionContext, scale: float, dropout_p: float) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if ctx.by_document:  # packed rows: each document as its own causal sequence, no (T, T) mask
        from .varlen import sdpa_by_document

        return sdpa_by_document(q, k, v, ctx, scale, dropout_p)
    # The shared boolean mask (not an additive float copy: that would stay alive for backward at 2-4x the bytes;
    # phi3_lightning.memory models this boolean mask, as measured on GPU).
    mask = ctx.bool_mask()
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and q.shape[2] > 1, scale=scale
    )
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- flash
_flash_override: tuple[Callable, Callable] | None = None


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def set_flash_kernels(kernels: tuple[Callable, Callable] | None) -> None:
    """Substitute (flash_attn_func, flash_attn_varlen_func); tests pass the reference kernels below."""
    global _flash_override
    _flash_override = kernels


def flash_available() -> tuple[bool, str]:
    if _flash_override is not None:
        return True, "substituted kernels"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not flash_attn_installed():
        return False, "the flash-attn package is not installed (pip install 'phi3_lightning[flash]')"
    return True, "flash-attn"


def _flash_kernels() -> tuple[Callable, Callable]:
    if _flash_override is not None:
        return _flash_override
    ok, why = flash_available()
    if not ok:
        raise RuntimeError(f"attn_implementation='flash_attention_2' is unavailable: {why}; use 'sdpa' instead")
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def _window(ctx: AttentionContext) -> tuple[int, int]:
    w = ctx.sliding_window
    # flash: key k visible iff q - left <= k <= q + right; causal=True cuts the right side.
    return (w - 1, w - 1) if w is not None else (-1, -1)


def _varlen_metadata(ctx: AttentionContext) -> dict:
    """Token indices of real tokens and cu_seqlens of the (document, row) segments, once per batch."""
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


def flash_attention(q, k, v, ctx: AttentionContext, scale: float, dropout_p: float) -> torch.Tensor:
    if ctx.offset > 0 or ctx.q_len != ctx.kv_len:  # cached decode: SDPA handles the offset mask
        return sdpa_attention(q, k, v, ctx, scale, dropout_p)
    func, varlen_func = _flash_kernels()
    if _flash_override is None and q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(
            f"flash_attention_2 runs in float16/bfloat16, got {q.dtype}; load with dtype=torch.bfloat16 "
            "or use bf16 precision"
        )
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D)
    if ctx.key_padding is None and ctx.doc_ids is None:
        return func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=True, window_size=_window(ctx))
    b, t, h, d = q.shape
    meta = _varlen_metadata(ctx)
    idx, cu, mx = meta["indices"], meta["cu_seqlens"], meta["max_seqlen"]
    q_u = q.reshape(b * t, h, d).index_select(0, idx)  # (N, H, D)
    k_u = k.reshape(b * t, k.shape[2], d).index_select(0, idx)
    v_u = v.reshape(b * t, v.shape[2], d).index_select(0, idx)
    out_u = varlen_func(
        q_u, k_u, v_u, cu, cu, mx, mx, dropout_p=dropout_p, softmax_scale=scale, causal=True, window_size=_window(ctx)
    )
    out = out_u.new_zeros(b * t, h, d).index_copy(0, idx, out_u)
    return out.view(b, t, h, d)


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
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1),
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


# ----------------------------------------------------------------------------- flex
class FlexUnsupportedError(NotImplementedError):
    """flex_attention cannot run this call here (e.g. a backward pass on CPU); the message says what to use."""


def flex_available() -> tuple[bool, str]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the installed torch
        return False, f"torch {torch.__version__} has no flex_attention ({e})"
    return True, "torch.nn.attention.flex_attention"


# Whether flex_attention is wrapped in torch.compile: None = auto (CUDA only), True / False = always / never.
# Measured on 2 CPU cores, torch 2.13, head_dim 32-128 (96 included): compiled flex is correct (max error vs fp64
# ~1e-6) and 2-10x faster than eager flex per call, but each new (batch, seq_len) shape costs 7-19 s of compile.
# Eager flex costs ~0.6 s of tracing on first use, then runs an unfused math path (scores materialised). Auto keeps
# CPU eager so tests, evaluation and mixed-length batches never stall on compiles; a model compiled as a whole
# (Lightning's compile setting) compiles flex with it anyway.
_flex_compile: bool | None = None
_compiled_flex: dict[str, Callable] = {}
# Head dims this torch's flex_attention rejected (older releases took only powers of two, e.g. not Phi-3's 96):
# such calls zero-pad q, k, v to the next power of two, which leaves q.k, the softmax and out[..., :d] unchanged.
_flex_padded_dims: set[int] = set()


def set_flex_compile(mode: bool | None) -> None:
    """Compile flex_attention (True), run it eagerly (False), or auto (None: compile on CUDA only)."""
    global _flex_compile
    if mode not in (None, True, False):
        raise ValueError(f"set_flex_compile takes True, False or None (auto), got {mode!r}")
    _flex_compile = mode


def flex_compiled(device: torch.device | str) -> bool:
    """True when the flex backend runs ``torch.compile(flex_attention)`` on ``device``."""
    return _flex_compile if _flex_compile is not None else torch.device(device).type == "cuda"


def _flex_fn(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if not flex_compiled(device):
        return flex_attention
    if device.type not in _compiled_flex:
        _compiled_flex[device.type] = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex[device.type]


def _block_mask(ctx: AttentionContext):
    if "block" in ctx.cache:
        return ctx.cache["block"]
    from torch.nn.attention.flex_attention import create_block_mask

    w = ctx.sliding_window
    pad = ctx.key_padding
    docs = ctx.doc_ids

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if w is not None:
            allowed = allowed & (kv_idx > q_idx - w)
        if pad is not None:
            allowed = allowed & pad[b, kv_idx]
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        return allowed | (kv_idx == q_idx)

    bsz = ctx.batch_size if (pad is not None or docs is not None) else None
    # On CUDA the mask itself is built by a compiled kernel (uncompiled it costs a dense (B, T, T) pass per
    # forward, which made flex 2-5x slower than sdpa there); on CPU eager construction is cheaper than compiling.
    compile_mask = ctx.device.type == "cuda"
    bm = create_block_mask(mask_mod, bsz, None, ctx.q_len, ctx.kv_len, device=ctx.device, _compile=compile_mask)
    ctx.cache["block"] = bm
    return bm


def _flex_call(fn: Callable, q, k, v, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, T, D); zero-pads the head dim when this torch cannot take it (see _flex_padded_dims)."""
    d = q.shape[-1]
    pad = (1 << (d - 1).bit_length()) - d if d in _flex_padded_dims else 0
    if pad:
        q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))  # (B, H, T, 2^n): extra dims are zeros
    out = fn(q, k, v, block_mask=_block_mask(ctx), scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[..., :d] if pad else out


def flex_attention_backend(q, k, v, ctx: AttentionContext, scale: float, dropout_p: float) -> torch.Tensor:
    if ctx.offset > 0 or ctx.q_len != ctx.kv_len:
        return sdpa_attention(q, k, v, ctx, scale, dropout_p)
    if dropout_p > 0:
        raise ValueError("the flex backend has no attention dropout; set attention_dropout=0 or use sdpa/eager")
    fn = _flex_fn(q.device)
    d = q.shape[-1]
    try:
        out = _flex_call(fn, q, k, v, ctx, scale)
    except NotImplementedError as e:
        if "backward" not in str(e):
            raise
        raise FlexUnsupportedError(
            f"flex_attention in torch {torch.__version__} has no backward pass on {q.device.type} (inference only "
            f"there); train with attn_implementation='sdpa' or 'eager', or run flex on CUDA"
        ) from e
    except ValueError as e:  # older torch: "NYI: Currently non power of 2 embedding dimension are not supported"
        if "power of 2" not in str(e) or d in _flex_padded_dims:
            raise
        _flex_padded_dims.add(d)
        warnings.warn(
            f"flex_attention in torch {torch.__version__} cannot take head_dim={d}; the flex backend zero-pads it to "
            f"{1 << (d - 1).bit_length()} (exact, more attention FLOPs); sdpa or a newer torch avoids the padding",
            stacklevel=2,
        )
        out = _flex_call(fn, q, k, v, ctx, scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- registry
ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": flash_attention,
    "flex": flex_attention_backend,
}


def backend_available(name: str) -> tuple[bool, str]:
    """(available, reason) for a backend name on this machine."""
    if name in ("eager", "sdpa"):
        return True, "built in"
    if name == "flash_attention_2":
        return flash_available()
    if name == "flex":
        return flex_available()
    return False, f"unknown backend {name!r}"


def check_backend(name: str) -> None:
    if name not in ATTENTION_FUNCTIONS:
        raise ValueError(f"unknown attn_implementation {name!r}; choose one of {', '.join(BACKENDS)}")
    ok, why = backend_available(name)
    if not ok:
        raise ValueError(f"attn_implementation={name!r} is unavailable here: {why}; use 'sdpa' instead")

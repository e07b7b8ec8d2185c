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

One :class:`Backend` record per backend, in :data:`BACKENDS`, is the only place a backend is named: how it attends,
how it prepares its per-batch context, whether it can run here (and why not), and what it saves for backward (read
by the memory planner). The backbone, the LightningModules, the memory planner and compare-attention all read it.

Adding a backend: write its ``attend`` (and ``prepare`` / ``available`` when it needs them) in this file and add one
``Backend(...)`` to :data:`BACKENDS`; then add it to the tests (``tests/model/test_packing_backends.py`` runs every
available backend against the documents-one-by-one reference, ``tests/test_compare.py`` against fp64 eager).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..options import did_you_mean
from .masking import AttentionContext
from .varlen import document_buckets, sdpa_by_document, varlen_metadata

DEFAULT_BACKEND = "sdpa"


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
    """Substitute (flash_attn_func, flash_attn_varlen_func), or restore flash-attn's with None; tests pass pure-torch
    kernels of the same signatures (``tests/model/reference_kernels.py``) to run the backend's glue on CPU."""
    global _flash_override
    _flash_override = kernels


def flash_kernels_substituted() -> bool:
    """True while :func:`set_flash_kernels` has replaced flash-attn's kernels."""
    return _flash_override is not None


def flash_available(device: torch.device | None = None, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """(available, reason); with ``device`` / ``dtype``: whether flash-attn can run there in that dtype."""
    if _flash_override is not None:
        return True, "substituted kernels"
    if device is not None and torch.device(device).type != "cuda":
        return False, f"flash-attn runs on CUDA only; device is {device}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not flash_attn_installed():
        return False, "the flash-attn package is not installed (pip install 'phi3_lightning[flash]')"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"flash-attn runs in float16/bfloat16; dtype is {str(dtype).replace('torch.', '')}"
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
    meta = varlen_metadata(ctx)
    idx, cu, mx = meta["indices"], meta["cu_seqlens"], meta["max_seqlen"]
    q_u = q.reshape(b * t, h, d).index_select(0, idx)  # (N, H, D)
    k_u = k.reshape(b * t, k.shape[2], d).index_select(0, idx)
    v_u = v.reshape(b * t, v.shape[2], d).index_select(0, idx)
    out_u = varlen_func(
        q_u, k_u, v_u, cu, cu, mx, mx, dropout_p=dropout_p, softmax_scale=scale, causal=True, window_size=_window(ctx)
    )
    out = out_u.new_zeros(b * t, h, d).index_copy(0, idx, out_u)
    return out.view(b, t, h, d)


# ----------------------------------------------------------------------------- flex
class FlexUnsupportedError(NotImplementedError):
    """flex_attention cannot run this call here (e.g. a backward pass on CPU); the message says what to use."""


def flex_available(device: torch.device | None = None, dtype: torch.dtype | None = None) -> tuple[bool, str]:
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


def flex_compile_setting() -> bool | None:
    """The current :func:`set_flex_compile` mode (None = auto)."""
    return _flex_compile


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


# Per-call kernel options of the compiled (Triton) flex kernel on CUDA. ROWS_GUARANTEED_SAFE lets it skip the
# empty-row checks: valid because the mask below always allows a query its own key (every row has >= 1 key;
# tests/model/test_packing_backends.py checks that on padded, packed and windowed batches). Tuning options
# (BLOCK_M, USE_TMA, ...) can be added with set_flex_kernel_options, e.g. by benchmarks/gpu_bench.py.
_FLEX_SAFE_OPTIONS: dict = {"ROWS_GUARANTEED_SAFE": True}
_flex_extra_options: dict = {}
_compiled_block_mask: Callable | None = None


def set_flex_kernel_options(options: dict | None) -> None:
    """Extra ``kernel_options`` for the compiled flex kernel on CUDA (see torch's ``FlexKernelOptions``; e.g.
    ``{"USE_TMA": True}``), or None to go back to the defaults. Eager flex (CPU by default) ignores them."""
    global _flex_extra_options
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"set_flex_kernel_options takes a dict or None, got {options!r}")
    _flex_extra_options = dict(options or {})


def flex_kernel_options(device: torch.device | str) -> dict | None:
    """The ``kernel_options`` the flex backend passes on ``device`` (None: torch's defaults)."""
    if not flex_compiled(device) or torch.device(device).type != "cuda":
        return None
    return {**_FLEX_SAFE_OPTIONS, **_flex_extra_options}


def _create_block_mask_fn(device: torch.device) -> Callable:
    """create_block_mask, compiled once per process on CUDA: uncompiled it evaluates the mask over a dense
    (B, T, T) grid with many small kernels on every forward (what made flex 2-5x slower than sdpa at small
    shapes on the H200); compiled it is one fused kernel. (torch's ``_compile=True`` flag is deprecated and
    wraps a new torch.compile on every call.) On CPU the eager construction is cheaper than a compile."""
    from torch.nn.attention.flex_attention import create_block_mask

    global _compiled_block_mask
    if device.type != "cuda":
        return create_block_mask
    if _compiled_block_mask is None:
        _compiled_block_mask = torch.compile(create_block_mask)
    return _compiled_block_mask


def flex_mask_mod(ctx: AttentionContext) -> Callable:
    """The flex mask rule of ``ctx`` (causal & window & padding & document, the diagonal always allowed)."""
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

    return mask_mod


def _block_mask(ctx: AttentionContext):
    """One block mask per batch (cached on ``ctx``, shared by every layer)."""
    if "block" in ctx.cache:
        return ctx.cache["block"]
    pad, docs = ctx.key_padding, ctx.doc_ids
    bsz = ctx.batch_size if (pad is not None or docs is not None) else None
    build = _create_block_mask_fn(ctx.device)
    bm = build(flex_mask_mod(ctx), bsz, None, ctx.q_len, ctx.kv_len, device=ctx.device)
    ctx.cache["block"] = bm
    return bm


def _flex_call(fn: Callable, q, k, v, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, T, D); zero-pads the head dim when this torch cannot take it (see _flex_padded_dims)."""
    d = q.shape[-1]
    pad = (1 << (d - 1).bit_length()) - d if d in _flex_padded_dims else 0
    if pad:
        q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))  # (B, H, T, 2^n): extra dims are zeros
    out = fn(
        q,
        k,
        v,
        block_mask=_block_mask(ctx),
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=flex_kernel_options(q.device),
    )
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


# ----------------------------------------------------------------------------- per-batch context
def _prepare_eager(ctx: AttentionContext, dtype: torch.dtype) -> None:
    ctx.additive_mask(dtype)


def _prepare_sdpa(ctx: AttentionContext, dtype: torch.dtype) -> None:
    if ctx.by_document:
        document_buckets(ctx, ctx.device)
    else:
        ctx.bool_mask()


def _prepare_flash(ctx: AttentionContext, dtype: torch.dtype) -> None:
    if ctx.offset > 0:  # cached decode runs through SDPA
        _prepare_sdpa(ctx, dtype)
    elif ctx.key_padding is not None or ctx.doc_ids is not None:
        varlen_metadata(ctx)


def _prepare_flex(ctx: AttentionContext, dtype: torch.dtype) -> None:
    if ctx.offset > 0:  # cached decode runs through SDPA
        _prepare_sdpa(ctx, dtype)
    else:
        _block_mask(ctx)


def _built_in(device: torch.device | None = None, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    return True, "built in"


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Backend:
    """Everything the package knows about one attention backend."""

    name: str
    # (q (B, H, Tq, D), k, v (B, Hkv, Tk, D), ctx, scale, dropout_p) -> (B, Tq, H, D)
    attend: Callable[..., torch.Tensor]
    # (ctx, compute dtype) -> None: builds what ``attend`` reads from ``ctx`` once per batch, before the layers
    # run (so a per-layer torch.compile never traces mask construction)
    prepare: Callable[[AttentionContext, torch.dtype], None]
    # (device=None, dtype=None) -> (ok, reason): whether it can run on this machine (on that device, in that dtype)
    available: Callable[..., tuple[bool, str]]
    # What ``attend`` saves for backward, per token of one layer (the memory planner's formula, ``memory.py``):
    # "scores": the (H, Tk) probabilities (eager); "repeated_kv": q, k and v repeated to H heads for GQA, packed or
    # padded rows run document by document, plain rows with an active window get a dense float bias (sdpa);
    # "fused": q, k and v as they are, no mask saved (flash_attention_2, flex).
    activations: Literal["scores", "repeated_kv", "fused"]
    description: str = ""


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "eager",
            eager_attention,
            _prepare_eager,
            _built_in,
            "scores",
            "additive float mask and fp32 softmax (the reference)",
        ),
        Backend(
            "sdpa",
            sdpa_attention,
            _prepare_sdpa,
            _built_in,
            "repeated_kv",
            "torch scaled_dot_product_attention; packed or padded rows document by document",
        ),
        Backend(
            "flash_attention_2",
            flash_attention,
            _prepare_flash,
            flash_available,
            "fused",
            "flash-attn kernels (CUDA, fp16/bf16); varlen for packed or padded rows",
        ),
        Backend(
            "flex",
            flex_attention_backend,
            _prepare_flex,
            flex_available,
            "fused",
            "torch flex_attention with one block mask",
        ),
    )
}


def backend_available(
    name: str, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[bool, str]:
    """(available, reason) for a backend name on this machine (on ``device``, in ``dtype`` when given)."""
    if name not in BACKENDS:
        return False, f"unknown backend {name!r}"
    return BACKENDS[name].available(device, dtype)


def check_backend(name: str, *, runnable: bool = True) -> Backend:
    """The record of backend ``name``; a ValueError naming the choices when unknown, or, with ``runnable``, saying
    why it cannot run on this machine."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        hint = did_you_mean(name, BACKENDS) if isinstance(name, str) else ""
        raise ValueError(f"unknown attn_implementation={name!r}; choose one of {', '.join(BACKENDS)}{hint}")
    if runnable:
        ok, why = backend.available()
        if not ok:
            raise ValueError(
                f"attn_implementation={name!r} is unavailable here: {why}; use {DEFAULT_BACKEND!r} instead"
            )
    return backend

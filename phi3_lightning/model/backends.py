"""Attention backends behind one switch: eager, sdpa, flash_attention_2, flex.

Every backend takes q (B, H, Tq, D), k and v (B, Hkv, Tk, D) (GQA: H is a multiple of Hkv) and an
:class:`~phi3_lightning.model.masking.AttentionContext`, and returns (B, Tq, H, D). They implement the same
mask rule (see ``masking.py``); only the representation differs:

- eager: an additive float mask and an fp32 softmax (the reference);
- sdpa: ``scaled_dot_product_attention`` with a boolean mask, or ``is_causal=True`` when that is exact;
- flash_attention_2: FlashAttention kernels, from the flash-attn package when it is installed, else from torch itself
  (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10; :func:`flash_kernel` names the one that runs). flash-attn:
  ``flash_attn_func`` for full rows, ``flash_attn_varlen_func`` with ``cu_seqlens`` for padded or packed batches
  (padding removed, documents as separate sequences), ``causal=True, window_size=(w-1, w-1)``. torch: ``varlen_attn``
  for every batch (full rows as B sequences of T), ``window_size=(w-1, 0)`` (its causal form), no dropout;
  :func:`use_torch_flash_impl` switches torch's kernels to FlashAttention-3/-4 where installed;
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

import importlib.metadata
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..options import did_you_mean
from .masking import AttentionContext
from .varlen import document_buckets, sdpa_by_document, sdpa_by_document_outside_graphs, varlen_metadata

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
        if torch.compiler.is_compiling():  # outside the graph: no recompile per packing layout
            return sdpa_by_document_outside_graphs()(q, k, v, ctx, scale, dropout_p)
        return sdpa_by_document(q, k, v, ctx, scale, dropout_p)
    # The shared boolean mask (not an additive float copy: that would stay alive for backward at 2-4x the bytes;
    # phi3_lightning.memory models this boolean mask, as measured on GPU).
    mask = ctx.bool_mask()
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and q.shape[2] > 1, scale=scale
    )
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- flash
# The flash_attention_2 backend runs one of two kernel families, chosen per device once per batch (``prepare``):
#   1. flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func`` when the flash-attn package is installed;
#   2. else torch's own ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10: FlashAttention-2 kernels inside
#      torch, CUDA, fp16/bf16; FA3/FA4 when activated with :func:`use_torch_flash_impl`);
#   3. else unavailable, with the reason.
# Tests substitute pure-torch stand-ins of either signature (:func:`set_flash_kernels`) to run the glue on CPU.
_flash_override: tuple[Callable, Callable] | None = None
_torch_varlen_override: Callable | None = None
_HALF = (torch.float16, torch.bfloat16)
# torch's FlashAttention implementations beyond the built-in FA2 and the module each one imports
_TORCH_FLASH_IMPLS = {
    "FA3": ("flash_attn_interface", "FlashAttention-3 (flash-attn's Hopper build)"),
    "FA4": ("flash_attn.cute", "FlashAttention-4 (flash-attn's CuTe build)"),
}


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def set_flash_kernels(
    kernels: tuple[Callable, Callable] | None = None, *, torch_varlen: Callable | None = None
) -> None:
    """Substitute the flash backend's kernels; every call replaces the whole substitution, so
    ``set_flash_kernels(None)`` restores the real kernels.

    ``kernels``: a (flash_attn_func, flash_attn_varlen_func) pair (the flash-attn path); ``torch_varlen``: a function
    with the signature of ``torch.nn.attention.varlen.varlen_attn`` (the torch path; its parameters are read with
    ``inspect.signature``, as the real one's are). When both are given the flash-attn pair runs, as flash-attn is
    preferred. Tests pass pure-torch kernels (``tests/model/reference_kernels.py``) to run the glue on CPU.
    """
    global _flash_override, _torch_varlen_override
    _flash_override = kernels
    _torch_varlen_override = torch_varlen
    _resolved.clear()


def flash_kernels_substituted() -> bool:
    """True while :func:`set_flash_kernels` has replaced the real kernels (flash-attn's or torch's)."""
    return _flash_override is not None or _torch_varlen_override is not None


@dataclass(frozen=True)
class _FlashKernel:
    """The kernel the flash backend runs on one device."""

    route: Literal["flash_attn", "torch_varlen"]
    name: str  # what :func:`flash_kernel` reports
    fns: tuple[Callable, ...]  # (func, varlen_func) for flash_attn; (varlen_attn,) for torch_varlen
    params: frozenset[str] = frozenset()  # torch_varlen: the parameter names of this torch's varlen_attn
    substituted: bool = False


def _torch_varlen_fn() -> tuple[Callable | None, str]:
    """(torch's varlen_attn, "") or (None, why this torch has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10 has)"
    return varlen_attn, ""


def _torch_flash_impl_label() -> str:
    """Which FlashAttention implementation torch's flash kernels run: FA2 (built in) unless FA3/FA4 is active."""
    import torch.nn.attention as tna

    current = getattr(tna, "current_flash_attention_impl", None)
    impl = current() if current is not None else None
    return _TORCH_FLASH_IMPLS[impl][1].split(" (")[0] if impl in _TORCH_FLASH_IMPLS else "FlashAttention-2"


def _torch_varlen_name() -> str:
    return f"torch {torch.__version__} varlen_attn ({_torch_flash_impl_label()})"


def _flash_attn_name() -> str:
    try:
        return f"flash-attn {importlib.metadata.version('flash-attn')}"
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source build without metadata
        return "flash-attn"


def _resolve_flash(device: torch.device | str | None = None) -> tuple[_FlashKernel | None, str]:
    """(kernel, "") for the flash backend on ``device`` (None: this machine's CUDA device), or (None, why not)."""
    if _flash_override is not None:  # flash-attn's pair substituted: preferred, as flash-attn is
        return _FlashKernel("flash_attn", "substituted kernels", tuple(_flash_override), substituted=True), ""
    if _torch_varlen_override is not None:
        params = frozenset(inspect.signature(_torch_varlen_override).parameters)
        name = "substituted kernels (torch varlen_attn signature)"
        return _FlashKernel("torch_varlen", name, (_torch_varlen_override,), params, substituted=True), ""
    if device is not None and torch.device(device).type != "cuda":
        return None, f"flash_attention_2 runs on CUDA only (flash-attn or torch's varlen_attn); device is {device}"
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    if flash_attn_installed():
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        return _FlashKernel("flash_attn", _flash_attn_name(), (flash_attn_func, flash_attn_varlen_func)), ""
    no_pkg = "the flash-attn package is not installed (pip install 'phi3_lightning[flash]') and "
    fn, why = _torch_varlen_fn()
    if fn is None:
        return None, no_pkg + why
    built = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    if built is not None and not built():
        return None, no_pkg + f"torch {torch.__version__} was built without its flash attention kernels"
    cuda = torch.device(device) if device is not None else torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(cuda)
    if major < 8:
        return None, no_pkg + (
            f"torch's flash kernels (varlen_attn) need compute capability >= 8.0; "
            f"{torch.cuda.get_device_name(cuda)} has {major}.{minor}"
        )
    params = frozenset(inspect.signature(fn).parameters)
    return _FlashKernel("torch_varlen", _torch_varlen_name(), (fn,), params), ""


def flash_available(device: torch.device | None = None, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """(available, reason); with ``device`` / ``dtype``: whether the flash backend can run there in that dtype. When
    available, the reason names the kernel that will run (as :func:`flash_kernel`)."""
    kernel, why = _resolve_flash(device)
    if kernel is None:
        return False, why
    if dtype is not None and not kernel.substituted and dtype not in _HALF:
        return False, f"flash_attention_2 runs in float16/bfloat16; dtype is {str(dtype).replace('torch.', '')}"
    return True, kernel.name


def flash_kernel(device: torch.device | str | None = None) -> str | None:
    """The kernel the flash_attention_2 backend runs on ``device`` (None: this machine's CUDA device), e.g.
    ``"flash-attn 2.7.4"`` or ``"torch 2.11.0 varlen_attn (FlashAttention-2)"`` (FlashAttention-3/-4 when activated
    with :func:`use_torch_flash_impl`), ``"substituted kernels ..."`` under :func:`set_flash_kernels`; None when the
    backend cannot run there (:func:`flash_available` says why)."""
    kernel, _ = _resolve_flash(device)
    return kernel.name if kernel is not None else None


def _module_present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


def use_torch_flash_impl(name: str | None) -> None:
    """Make torch's flash kernels (SDPA's flash path and ``varlen_attn``) run FlashAttention-3 (``"FA3"``, Hopper)
    or -4 (``"FA4"``) through ``torch.nn.attention.activate_flash_attention_impl``; ``None`` restores torch's built-in
    FlashAttention-2. A ValueError says why when this torch lacks the API or the implementation's module
    (``flash_attn_interface`` for FA3, ``flash_attn.cute`` for FA4) is not installed; the active implementation is
    then unchanged. Does not affect the flash-attn package's kernels (preferred when installed)."""
    import torch.nn.attention as tna

    activate = getattr(tna, "activate_flash_attention_impl", None)
    if name is None:
        restore = getattr(tna, "restore_flash_attention_impl", None)
        current = getattr(tna, "current_flash_attention_impl", None)
        if restore is not None and current is not None and current() is not None:
            restore()
        _resolved.clear()
        return
    if activate is None:
        raise ValueError(
            f"torch {torch.__version__} has no torch.nn.attention.activate_flash_attention_impl, so {name!r} cannot be "
            "activated; torch's built-in FlashAttention-2 stays (a newer torch has FA3/FA4)"
        )
    known = tna.list_flash_attention_impls() if hasattr(tna, "list_flash_attention_impls") else list(_TORCH_FLASH_IMPLS)
    if name not in known:
        raise ValueError(f"unknown flash attention implementation {name!r}; torch {torch.__version__} has {known}")
    module, what = _TORCH_FLASH_IMPLS.get(name, (None, name))
    if module is not None and not _module_present(module):
        raise ValueError(
            f"{name} ({what}) needs the Python module {module!r}, which is not installed; "
            "torch's built-in FlashAttention-2 stays active"
        )
    _resolved.clear()  # the kernel's name changes
    try:
        activate(name)
    except (ImportError, RuntimeError) as e:
        raise ValueError(f"torch could not activate {name} ({what}): {e}") from e


def _window(ctx: AttentionContext) -> tuple[int, int]:
    w = ctx.sliding_window
    # flash-attn: key k visible iff q - left <= k <= q + right; causal=True cuts the right side.
    return (w - 1, w - 1) if w is not None else (-1, -1)


# the resolved kernel per (device, substitution): the same object every batch (a per-layer torch.compile guards on
# what it reads from the context), and no package lookup per batch
_resolved: dict[tuple, _FlashKernel] = {}


def _flash_kernel_of(ctx: AttentionContext, device: torch.device) -> _FlashKernel:
    kernel = ctx.cache.get("flash_kernel")
    if kernel is None:
        key = (str(device), id(_flash_override), id(_torch_varlen_override))
        kernel = _resolved.get(key)
        if kernel is None:
            kernel, why = _resolve_flash(device)
            if kernel is None:
                raise RuntimeError(f"attn_implementation='flash_attention_2' is unavailable: {why}; use 'sdpa' instead")
            _resolved[key] = kernel
        ctx.cache["flash_kernel"] = kernel
    return kernel


def flash_attention(q, k, v, ctx: AttentionContext, scale: float, dropout_p: float) -> torch.Tensor:
    if ctx.offset > 0 or ctx.q_len != ctx.kv_len:  # cached decode: SDPA handles the offset mask
        return sdpa_attention(q, k, v, ctx, scale, dropout_p)
    kernel = _flash_kernel_of(ctx, q.device)
    if not kernel.substituted and q.dtype not in _HALF:
        raise RuntimeError(
            f"flash_attention_2 runs in float16/bfloat16, got {q.dtype}; load with dtype=torch.bfloat16 "
            "or use bf16 precision"
        )
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D)
    if kernel.route == "torch_varlen":
        return _torch_varlen_attention(kernel, q, k, v, ctx, scale, dropout_p)
    func, varlen_func = kernel.fns
    if ctx.key_padding is None and ctx.doc_ids is None:
        return func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=True, window_size=_window(ctx))
    meta = varlen_metadata(ctx)
    idx, cu, mx = meta["indices"], meta["cu_seqlens"], meta["max_seqlen"]
    q_u, k_u, v_u = _unpad(q, k, v, idx)
    out_u = varlen_func(
        q_u, k_u, v_u, cu, cu, mx, mx, dropout_p=dropout_p, softmax_scale=scale, causal=True, window_size=_window(ctx)
    )
    return _pad_back(out_u, idx, q.shape)


def _unpad(q, k, v, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, T, H, D), k/v (B, T, Hkv, D) -> their real tokens ``idx`` of the (B * T) layout: (N, H|Hkv, D)."""
    return tuple(x.reshape(-1, x.shape[2], x.shape[3]).index_select(0, idx) for x in (q, k, v))


def _pad_back(out_u: torch.Tensor, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(N, H, D) outputs of the real tokens -> (B, T, H, D), zeros at the padding."""
    b, t, h, d = shape
    return out_u.new_zeros(b * t, h, d).index_copy(0, idx, out_u).view(b, t, h, d)


def _uniform_cu_seqlens(ctx: AttentionContext) -> torch.Tensor:
    """(B + 1,) int32 [0, T, 2T, ...]: full rows as B sequences of T for torch's varlen_attn (once per batch)."""
    if "cu_uniform" not in ctx.cache:
        t = ctx.q_len
        ctx.cache["cu_uniform"] = torch.arange(0, (ctx.batch_size + 1) * t, t, dtype=torch.int32, device=ctx.device)
    return ctx.cache["cu_uniform"]


def _torch_varlen_attention(kernel: _FlashKernel, q, k, v, ctx: AttentionContext, scale: float, dropout_p: float):
    """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D) through torch's varlen_attn.

    varlen_attn has no dropout; it is causal iff ``window_size == (-1, 0)``, and ``(left, 0)`` lets query q see keys
    q - left .. q (flash semantics), so Phi-3's window w (q - w < k <= q) is ``(w - 1, 0)``. Older releases lack
    ``window_size`` (torch 2.10 has ``is_causal``), ``enable_gqa`` or ``scale``: read from the signature.
    """
    (fn,), params = kernel.fns, kernel.params
    if dropout_p > 0:
        raise ValueError(
            f"flash_attention_2 through torch's varlen_attn has no attention dropout (attention_dropout={dropout_p}); "
            "set attention_dropout=0, or use sdpa/eager, or install flash-attn"
        )
    b, t, h, d = q.shape
    hkv = k.shape[2]
    full = ctx.key_padding is None and ctx.doc_ids is None
    if full:  # B sequences of T: a reshape, no gather
        idx, cu, mx = None, _uniform_cu_seqlens(ctx), t
        q_u, k_u, v_u = q.reshape(b * t, h, d), k.reshape(b * t, hkv, d), v.reshape(b * t, hkv, d)
    else:
        meta = varlen_metadata(ctx)
        idx, cu, mx = meta["indices"], meta["cu_seqlens"], meta["max_seqlen"]
        q_u, k_u, v_u = _unpad(q, k, v, idx)  # (N, H|Hkv, D)
    w = ctx.sliding_window
    bites = w is not None and w < mx  # a window as long as the longest sequence changes nothing
    kwargs: dict = {}
    if "window_size" in params:
        kwargs["window_size"] = (w - 1, 0) if bites else (-1, 0)  # a tuple: (-1, 0) is compared to a tuple
    elif bites:
        raise ValueError(
            f"torch {torch.__version__}'s varlen_attn has no window_size, and sliding_window={w} is shorter than this "
            f"batch's longest sequence ({mx} tokens); use attn_implementation='sdpa' (or 'flex'), or a newer torch "
            "whose varlen_attn takes window_size"
        )
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        raise RuntimeError(f"torch {torch.__version__}'s varlen_attn takes neither window_size nor is_causal")
    if h != hkv:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # (N, Hkv, D) -> (N, H, D), kv head j // n_rep for query head j (as repeat_kv)
            n = k_u.shape[0]
            n_rep = h // hkv
            k_u = k_u[:, :, None].expand(n, hkv, n_rep, d).reshape(n, h, d)
            v_u = v_u[:, :, None].expand(n, hkv, n_rep, d).reshape(n, h, d)
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != d**-0.5:  # torch 2.10: the default 1/sqrt(d) only; fold the rest into q
        q_u = q_u * (scale * d**0.5)
    out_u = fn(q_u, k_u, v_u, cu, cu, mx, mx, **kwargs)  # (N, H, D)
    if idx is None:
        return out_u.view(b, t, h, d)
    return _pad_back(out_u, idx, q.shape)


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
        if "torch._dynamo" in sys.modules:  # compiling may follow: make the wrapper here, not while tracing
            sdpa_by_document_outside_graphs()
    else:
        ctx.bool_mask()


def _prepare_flash(ctx: AttentionContext, dtype: torch.dtype) -> None:
    if ctx.offset > 0:  # cached decode runs through SDPA
        _prepare_sdpa(ctx, dtype)
        return
    kernel = _flash_kernel_of(ctx, ctx.device)  # which kernel runs, decided once per batch
    if ctx.key_padding is not None or ctx.doc_ids is not None:
        varlen_metadata(ctx)
    elif kernel.route == "torch_varlen":
        _uniform_cu_seqlens(ctx)


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
            "flash-attn's kernels, else torch's varlen_attn (CUDA, fp16/bf16); varlen for packed or padded rows",
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

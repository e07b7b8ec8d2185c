"""Fused kernels for RMSNorm, SwiGLU and RoPE behind one switch (``fused_kernels``), exact in semantics to the eager
modules (norm.py, mlp.py, rope.py):

* ``rms_norm(x, weight, eps) -> y``: normalise in fp32, cast to ``x.dtype``, then times ``weight``;
* ``swiglu(gate_up) -> up * silu(gate)`` of the gate_up_proj output ``[gate | up]`` (after its LoRA adapter, if any);
* ``rope(q, k, cos, sin) -> (q, k)``: q (B, H, T, D), k (B, Hkv, T, D), cos/sin (B, T, R) with R <= D (partial
  rotary: the first R dims are rotated, half-split ``rotate_half`` convention).

A kernel set may leave an entry None ("use the eager one"). ``fused_kernels=None`` is today's eager code.

Sets (:data:`FUSED_KERNELS`):

* ``compile``: the package's own pure-torch functions, each wrapped once in ``torch.compile(dynamic=True)`` (so rows
  of new lengths do not recompile), created on first use. Runs on CPU and CUDA. Inside an outer ``torch.compile``
  (``torch_compile: layers``) the plain function is traced into the outer graph instead.
* ``liger``: Liger Kernel's Triton ops (``pip install 'phi3_lightning[liger]'``; CUDA only), imported on first use.
  RMSNorm in casting mode "llama" (fp32 rstd, cast to x.dtype before the weight: transformers' Phi3RMSNorm);
  SwiGLU on the fused ``[gate | up]`` tensor (gate = first half, as Phi-3); every kernel out of place where the
  tensor it would overwrite can be seen by anyone else (see the comments at each call).

The modules read a plain attribute ``fused`` (the :class:`FusedKernels` record, never a submodule, never in a
state_dict) that :meth:`Phi3Model.set_fused_kernels` sets; checkpoints and exports do not change.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..options import did_you_mean
from .mlp import swiglu
from .norm import rms_norm
from .rope import rotate_qk

SILU_ACTIVATIONS = ("silu", "swish")
LIGER_INSTALL = "pip install 'phi3_lightning[liger]'"


class _Compiled:
    """``fn`` through one lazily created ``torch.compile(fn, dynamic=True)``; the plain ``fn`` when already inside
    a graph being compiled (the outer compile fuses it)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._compiled: Callable | None = None
        self.__name__ = f"compiled_{fn.__name__}"

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        return self._compiled(*args)


# ------------------------------------------------------------------ liger (CUDA, Triton); imported when called
def _liger_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != weight.dtype:
        # eager promotes (fp32 weight * bf16 normalised x -> fp32); Liger stores in x.dtype: keep the eager numbers
        return rms_norm(x, weight, eps)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # (X, W, eps, offset, casting_mode, in_place, row_mode): in_place=False, so dY (the gradient handed to this
    # node, which a hook or a retained graph may still hold) is never overwritten with dX
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False, None)


def _liger_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

    # gate = columns [0, I), up = [I, 2I) of each row (Phi-3's [gate | up]); in_place=False keeps the saved
    # gate_up intact, so a second backward (retain_graph) or a checkpoint recompute reads activations, not grads
    return LigerFusedGateUpSiLUMulFunction.apply(gate_up, False)


def _liger_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dtype != cos.dtype or k.dtype != cos.dtype:
        # eager promotes (bf16 q * fp32 cos under autocast -> fp32 q); the kernel stores in q's dtype: keep eager
        return rotate_qk(q, k, cos, sin)
    from liger_kernel.ops.rope import LigerRopeFunction

    # The kernel rotates the (B, T, H, D)-contiguous copy of q / k in place. It copies a strided view itself (the
    # qkv_proj slices for T > 1); where the view is already contiguous (T == 1, decode) it would write into the
    # caller's buffer, so it gets a fresh one.
    if q.transpose(1, 2).is_contiguous():
        q = q.transpose(1, 2).clone().transpose(1, 2)
    if k.transpose(1, 2).is_contiguous():
        k = k.transpose(1, 2).clone().transpose(1, 2)
    # rotary_dim = cos.shape[-1] (partial rotary: the first R dims; cos/sin are cat(freqs, freqs))
    return LigerRopeFunction.apply(q, k, cos, sin, None, 1, cos.shape[-1])


def _compile_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _liger_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"needs CUDA; device is {device.type}"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, f"liger-kernel is not installed; {LIGER_INSTALL}"
    if importlib.util.find_spec("triton") is None:
        return False, f"triton is not installed (liger-kernel's kernels are Triton); {LIGER_INSTALL}"
    return True, ""


@dataclass(frozen=True)
class FusedKernels:
    """One kernel set: each entry a function with the eager semantics, or None for the eager module."""

    name: str
    description: str
    rms_norm: Callable | None
    swiglu: Callable | None
    rope: Callable | None
    available: Callable[[torch.device], tuple[bool, str]]

    def __reduce__(self):
        # pickled / deep-copied modules refer to the registry's record (its compiled functions are not copyable)
        return (get_fused_kernels, (self.name,))


FUSED_KERNELS: dict[str, FusedKernels] = {
    "compile": FusedKernels(
        "compile",
        "the package's own RMSNorm / SwiGLU / RoPE functions through torch.compile (CPU and CUDA)",
        _Compiled(rms_norm),
        _Compiled(swiglu),
        _Compiled(rotate_qk),
        _compile_available,
    ),
    "liger": FusedKernels(
        "liger",
        f"Liger Kernel's Triton RMSNorm / SwiGLU / RoPE (CUDA; {LIGER_INSTALL})",
        _liger_rms_norm,
        _liger_swiglu,
        _liger_rope,
        _liger_available,
    ),
}
"""name -> kernel set; the one list of ``fused_kernels`` choices (None = eager)."""


def get_fused_kernels(name: str) -> FusedKernels:
    """The registry record of ``name``; a ValueError naming the choices (and the closest one) when unknown."""
    kernels = FUSED_KERNELS.get(name) if isinstance(name, str) else None
    if kernels is None:
        hint = did_you_mean(name, FUSED_KERNELS) if isinstance(name, str) else ""
        raise ValueError(
            f"unknown fused_kernels={name!r}; choose one of {', '.join(FUSED_KERNELS)} or null (eager){hint}"
        )
    return kernels


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fused_available(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """(available, reason) of kernel set ``name`` on ``device`` (default: CUDA when present, else the CPU)."""
    if name not in FUSED_KERNELS:
        return False, f"unknown fused kernel set {name!r}"
    return FUSED_KERNELS[name].available(_device(device))


def check_fused_kernels(
    name: str | None,
    *,
    hidden_act: str | None = None,
    device: torch.device | str | None = None,
    runnable: bool = True,
) -> FusedKernels | None:
    """The kernel set ``name`` (None -> None, the eager code); a ValueError when unknown, when it fuses SwiGLU but
    ``hidden_act`` is no SiLU, or, with ``runnable``, when it cannot run on ``device``."""
    if name is None:
        return None
    kernels = get_fused_kernels(name)
    if hidden_act is not None and kernels.swiglu is not None and hidden_act not in SILU_ACTIVATIONS:
        raise ValueError(
            f"fused_kernels={name!r} fuses SwiGLU (up * silu(gate)), but this model's hidden_act={hidden_act!r}; "
            "use fused_kernels=null for it"
        )
    if runnable:
        ok, why = fused_available(name, device)
        if not ok:
            raise ValueError(f"fused_kernels={name!r} is unavailable here: {why}; use 'compile' or null (eager)")
    return kernels

"""Selective (op-level) activation checkpointing: keep the outputs of the expensive ops, recompute the rest.

A decoder layer run under ``checkpoint(layer, ..., use_reentrant=False, context_fn=selective_context_fn(...))``
keeps, in the forward, only the results of the ops in :data:`SAVED_OPS` (matrix products and attention kernels,
less down_proj's output, which no backward reads) plus its input; in backward it reruns the layer's forward, where each saved op returns its stored result instead of running
again and everything else (RMSNorm and its fp32 copies, RoPE, SiLU * up, casts, gathers, masks) is recomputed. The
matmuls and attention therefore run once, as without checkpointing: the extra compute is elementwise work only.

What one layer keeps, per token (``a`` compute bytes; see :mod:`phi3_lightning.memory` for the exact formula):
the qkv_proj, o_proj and gate_up_proj outputs (not down_proj's: nothing in backward reads it), the attention output (+ its fp32 logsumexp for the fused
kernels; eager attention's two ``bmm`` outputs, the (H, Tk) scores among them), LoRA's two products per adapted
projection, and the layer input. Built on :func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _packets(namespace, names: tuple[str, ...]) -> set:
    """The op packets of ``names`` that exist in this torch build (newer kernels are absent from older builds)."""
    return {getattr(namespace, n) for n in names if hasattr(namespace, n)}


_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "linear", "_scaled_mm")
_ATTENTION = (
    "_scaled_dot_product_flash_attention_for_cpu",  # CPU SDPA (its fused kernel)
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",  # varlen / explicit flash kernels
    "_efficient_attention_forward",
    "_cudnn_attention_forward",
)


def _saved_ops() -> frozenset:
    ops = _packets(torch.ops.aten, _MATMULS) | _packets(torch.ops.aten, _ATTENTION)
    # torch's FlashAttention varlen op (torch.nn.attention.varlen, a custom op) where this build has it
    try:
        ops |= _packets(torch.ops.torch_attn, ("_varlen_attn", "_varlen_attn_out"))
    except (AttributeError, RuntimeError):
        pass
    return frozenset(ops)


SAVED_OPS: frozenset = _saved_ops()
_SAVED_HOPS = ("flex_attention",)  # higher-order operators (no overload packet), by name


def saves(op) -> bool:
    """Whether the selective policy keeps ``op``'s output (an OpOverload or a higher-order operator)."""
    packet = getattr(op, "overloadpacket", None)
    if packet is not None:
        return packet in SAVED_OPS
    return getattr(op, "__name__", None) in _SAVED_HOPS or getattr(op, "_name", None) in _SAVED_HOPS


def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """MUST_SAVE the matmuls and attention kernels, PREFER_RECOMPUTE everything else (the same answer in the
    forward and in the recompute, as the caching requires)."""
    return CheckpointPolicy.MUST_SAVE if saves(op) else CheckpointPolicy.PREFER_RECOMPUTE


def layer_policy(intermediate_size: int, hidden_size: int, attention_width: int):
    """:func:`policy` for Phi-3 decoder layers, less one output no backward reads: down_proj's (an
    ``(N, intermediate) @ (intermediate, hidden)`` mm, only added to the residual stream; the recompute stops before
    it, so it would be kept for nothing). Recognised by its shape; when o_proj has the same shape
    (``attention_width == intermediate_size``) nothing is left out."""
    mm = torch.ops.aten.mm.default
    skip = intermediate_size != attention_width

    def layer(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if not saves(op):
            return CheckpointPolicy.PREFER_RECOMPUTE
        if skip and op is mm and args[0].shape[-1] == intermediate_size and args[1].shape[-1] == hidden_size:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE

    return layer


def selective_context_fn(intermediate_size: int, hidden_size: int, attention_width: int):
    """``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` (non-reentrant) around one decoder layer: a
    fresh pair of contexts per checkpointed call."""
    return functools.partial(
        create_selective_checkpoint_contexts, layer_policy(intermediate_size, hidden_size, attention_width)
    )

"""Phi-3 self-attention: fused qkv ([Q | K | V] rows), GQA, RoPE, KV cache; the backend comes with the context."""

from __future__ import annotations

import torch
from torch import nn

from .backends import BACKENDS, DEFAULT_BACKEND
from .config import Phi3Config
from .linear import Linear
from .masking import AttentionContext
from .rope import apply_rotary


class Phi3Attention(nn.Module):
    fused = None  # a FusedKernels set (model/fused.py) put here by Phi3Model.set_fused_kernels; None = eager

    def __init__(self, config: Phi3Config, layer_idx: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_size
        self.scale = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        shapes = config.linear_shapes()  # {name: (out, in)}
        (qkv_out, qkv_in), (o_out, o_in) = shapes["qkv_proj"], shapes["o_proj"]
        self.qkv_proj = Linear(config.initializer_range, qkv_in, qkv_out, bias=False, device=device)
        self.o_proj = Linear(config.initializer_range, o_in, o_out, bias=False, device=device)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext,
        cache=None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (H + 2 Hkv) D)
        hq, hkv = self.num_heads, self.num_kv_heads
        cos, sin = rope
        if self.fused is not None and self.fused.rope is not None:
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q, k, v = (z.view(b, t, -1, d).transpose(1, 2) for z in (q, k, v))  # (B, H|Hkv, T, D)
            q, k = self.fused.rope(q, k, cos, sin)
        elif t == 1:
            # Decode step: q and k rotated together in one (B, 1, H + Hkv, D) pass (half the elementwise calls);
            # with T = 1 the (B, H, 1, D) views of the result are contiguous.
            qk = apply_rotary(qkv[..., : (hq + hkv) * d].view(b, t, hq + hkv, d), cos, sin, heads_axis=2)
            q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)
            v = qkv[..., (hq + hkv) * d :].view(b, t, hkv, d).transpose(1, 2)
        else:
            # Separately, so q and k come out contiguous in (B, H, T, D): CPU SDPA's backward is slower on
            # the strided views a joint rotation would give.
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q = apply_rotary(q.view(b, t, hq, d).transpose(1, 2), cos, sin)  # (B, H, T, D)
            k = apply_rotary(k.view(b, t, hkv, d).transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
            v = v.view(b, t, hkv, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, ctx.k_start)  # (B, Hkv, Tk, D) visible keys
        dropout = self.attention_dropout if self.training else 0.0
        # the backbone's backend; a context built by hand (a layer run alone) gets the default, which builds its
        # masks on demand
        attend = ctx.attend if ctx.attend is not None else BACKENDS[DEFAULT_BACKEND].attend
        out = attend(q, k, v, ctx, self.scale, dropout)  # (B, T, H, D)
        return self.o_proj(out.reshape(b, t, self.num_heads * d))

"""Rotary position embeddings: plain RoPE, LongRoPE (short/long factor switch) and partial rotary.

Convention (transformers' Phi-3): half-split rotation, ``rotate_half(x) = cat(-x2, x1)``; only the first
``rotary_dim = int(head_dim * partial_rotary_factor)`` dims of each head are rotated.

LongRoPE: one regime for the whole forward. If ``max(position_ids) + 1 > original_max_position_embeddings`` the
long factors are used for every position, else the short ones; cos/sin are multiplied by the attention factor
``sqrt(1 + ln(max/orig) / ln(orig))``. The choice is made with ``torch.where`` on tensors, so it does not break a
``torch.compile`` graph.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Phi3Config


class Phi3RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape (B, T, rotary_dim) for given position ids."""

    def __init__(self, config: Phi3Config, device: torch.device | None = None) -> None:
        super().__init__()
        self.rotary_dim = config.rotary_dim
        self.base = float(config.rope_theta)
        self.original_max = config.original_max_position_embeddings
        self.longrope = config.is_longrope
        self.attention_factor = config.longrope_attention_factor()
        self._short = list(config.rope_scaling["short_factor"]) if self.longrope else None
        self._long = list(config.rope_scaling["long_factor"]) if self.longrope else None
        half = self.rotary_dim // 2
        # Non-persistent buffers: never in a checkpoint, rebuilt by reset_parameters() after meta-device init.
        self.register_buffer("short_inv_freq", torch.empty(half, device=device), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(half, device=device), persistent=False)
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def _inv_freq(self, factors: list[float] | None, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).float() / self.rotary_dim
        inv = 1.0 / (self.base**exponent)  # (rotary_dim/2,)
        if factors is not None:
            inv = 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * self.base**exponent)
        return inv

    @torch.no_grad()
    def reset_parameters(self) -> None:
        device = self.short_inv_freq.device
        if device.type == "meta":
            return
        self.short_inv_freq.copy_(self._inv_freq(self._short, device))
        self.long_inv_freq.copy_(self._inv_freq(self._long if self.longrope else None, device))

    def inv_freq_for(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The inverse frequencies of this forward's regime (long iff max position + 1 > original max)."""
        if not self.longrope:
            return self.short_inv_freq
        use_long = position_ids.max() + 1 > self.original_max  # 0-dim bool tensor, no host sync
        return torch.where(use_long, self.long_inv_freq, self.short_inv_freq)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq_for(position_ids).float()
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
        cos = emb.cos() * self.attention_factor
        sin = emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_axis: int = 1) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x with cos/sin (B, T, R).

    x is (B, H, T, D) with ``heads_axis=1`` (default) or (B, T, H, D) with ``heads_axis=2``.
    """
    cos, sin = cos.unsqueeze(heads_axis), sin.unsqueeze(heads_axis)  # broadcast over heads
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D) and k (B, Hkv, T, D) rotated with cos/sin (B, T, R), R <= D (partial rotary)."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

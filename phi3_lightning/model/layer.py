"""Pre-norm decoder layer: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Phi3Attention
from .config import Phi3Config
from .masking import AttentionContext
from .mlp import Phi3MLP
from .norm import Phi3RMSNorm


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx, device=device)
        self.mlp = Phi3MLP(config, device=device)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, rope, ctx: AttentionContext, cache=None) -> torch.Tensor:
        x = x + self.resid_attn_dropout(self.self_attn(self.input_layernorm(x), rope, ctx, cache))
        x = x + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x

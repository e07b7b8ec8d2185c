"""Fused gated MLP: gate_up_proj = [gate | up] rows, out = down(up * act(gate))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Phi3Config
from .linear import Linear

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``up * silu(gate)`` of a gate_up_proj output ``[gate | up]`` (..., 2 I) -> (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


class Phi3MLP(nn.Module):
    fused = None  # a FusedKernels set (model/fused.py) put here by Phi3Model.set_fused_kernels; None = eager

    def __init__(self, config: Phi3Config, device: torch.device | None = None) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        shapes = config.linear_shapes()  # {name: (out, in)}
        (gu_out, gu_in), (down_out, down_in) = shapes["gate_up_proj"], shapes["down_proj"]
        self.gate_up_proj = Linear(config.initializer_range, gu_in, gu_out, bias=False, device=device)
        self.down_proj = Linear(config.initializer_range, down_in, down_out, bias=False, device=device)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused.swiglu is not None:
            # after gate_up_proj (and its LoRA adapter, if any): the same [gate | up] tensor, one fused kernel
            return self.down_proj(self.fused.swiglu(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(up * self.act(gate))

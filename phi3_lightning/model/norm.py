"""RMSNorm as in Phi-3: normalise in fp32, cast back to the input dtype, then scale by the weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Phi-3's RMSNorm as a function: normalise in fp32, cast back to ``x.dtype``, then times ``weight``."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class Phi3RMSNorm(nn.Module):
    fused = None  # a FusedKernels set (model/fused.py) put here by Phi3Model.set_fused_kernels; None = eager

    def __init__(self, hidden_size: int, eps: float = 1e-5, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device))
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused.rms_norm is not None:
            return self.fused.rms_norm(x, self.weight, self.eps)
        if (
            x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
        ):
            # same operations in the same order, one call (bit-identical on CPU; fewer kernels in backward too);
            # not under autocast, which may run rms_norm in the low-precision dtype
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"

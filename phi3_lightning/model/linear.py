"""Linear and Embedding layers whose ``reset_parameters()`` is Phi-3's init (normal(0, initializer_range)).

Lightning's FSDP2 path materialises meta-device modules by calling each module's ``reset_parameters()``;
with these classes that gives the same init as a model built eagerly. State-dict keys are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Inference on CPU with a handful of rows (decoding, short prompts): MKL runs x @ W.T for such shapes on one
# thread (the 32064 x 384 output layer of the benchmark model: 10 GB/s, half the machine's bandwidth, and 2-3x
# slower for 2-8 rows than for 1). Splitting W's rows into one batch per thread and calling bmm spreads the
# matrix-vector products over the threads: the same dot products (each output over the full input width),
# so the result is equal to F.linear up to summation order. Measured in benchmarks/compare_transformers.py.
_SPLIT_MAX_ROWS = 32


def _row_split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for small CPU inference inputs via a row-split bmm; None where it does not apply."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not weight.is_contiguous():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    out_f, in_f = weight.shape
    rows = x.numel() // in_f if in_f else 0
    parts = torch.get_num_threads()
    if parts < 2 or rows == 0 or rows > _SPLIT_MAX_ROWS or out_f < 256 or x.dtype != weight.dtype:
        return None
    parts = min(parts, 8)
    while parts > 1 and out_f % parts:
        parts -= 1
    if parts < 2:
        return None
    x2 = x.reshape(rows, in_f)
    y = torch.bmm(x2.unsqueeze(0).expand(parts, rows, in_f), weight.view(parts, out_f // parts, in_f).transpose(1, 2))
    y = y.view(rows, out_f) if rows == 1 else y.transpose(0, 1).reshape(rows, out_f)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_f)


class Linear(nn.Linear):
    def __init__(self, std: float, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        self.std = std
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _row_split_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) if y is None else y


class Embedding(nn.Embedding):
    def __init__(
        self,
        std: float,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        self.std = std
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.padding_idx is not None:
            self.weight[self.padding_idx].zero_()

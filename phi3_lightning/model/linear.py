"""Linear and Embedding layers whose ``reset_parameters()`` is Phi-3's init (normal(0, initializer_range)).

Lightning's FSDP2 path materialises meta-device modules by calling each module's ``reset_parameters()``;
with these classes that gives the same init as a model built eagerly. State-dict keys are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    def __init__(self, std: float, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        self.std = std
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    def __init__(self, std: float, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 device=None, dtype=None):
        self.std = std
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.padding_idx is not None:
            self.weight[self.padding_idx].zero_()

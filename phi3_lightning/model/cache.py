"""A preallocated (static) KV cache: one buffer per layer, written in place, never re-allocated."""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of already processed tokens, (B, Hkv, max_len, D) per layer.

    ``length`` counts tokens stored; the backbone advances it once per forward after all layers wrote.
    ``update`` returns views of the visible keys only (from ``k_start``, the sliding window's first visible
    key), so a decode step with a window reads at most ``window`` keys.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self._pending = 0
        self.long_rope: bool | None = None  # the LongRoPE regime the cached keys were computed in

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        return cls(
            config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads, config.head_size, dtype, device
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_start: int = 0):
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens but {end} are needed; allocate a larger cache")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        self._pending = t
        return self.k[layer, :, :, k_start:end], self.v[layer, :, :, k_start:end]

    def advance(self) -> None:
        self.length += self._pending
        self._pending = 0

    def reset(self) -> None:
        self.length = 0
        self._pending = 0
        self.long_rope = None

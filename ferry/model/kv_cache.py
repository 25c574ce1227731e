"""KV cache preallocated to the run's context length; rollback is moving the length back."""

from __future__ import annotations

import torch

from ferry.errors import FerryError
from ferry.model.config import ModelConfig


class KVCache:
    """Keys and values [layers, kv_heads, capacity, head_dim]; positions >= `length` are free.

    Allocated once so the decode loop never allocates; a rejected draft is undone by `rollback`,
    which only moves `length` (stale entries are overwritten by the next write).

    `full_length`: the leading positions whose entries the full weights wrote (a prefill, dense
    steps, verified chunks). Only those may be reused by a later request: a sparse step's
    entries differ from what a cold prefill would write.
    """

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        if capacity < 1:
            raise FerryError(f"context length must be at least 1, got {capacity}")
        shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # each layer's keys and values [1, kv_heads, capacity, head_dim] (SDPA's layout), made
        # once: a decode step of a small model is short enough for per-layer views to show
        self._layers = [(self.k[i:i + 1], self.v[i:i + 1]) for i in range(cfg.num_layers)]
        self.length = 0
        self.full_length = 0

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values as views [1, kv_heads, capacity, head_dim]."""
        return self._layers[index]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        self.length = self.full_length = 0

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length} positions")
        self.length = length
        self.full_length = min(self.full_length, length)

    def wrote(self, start: int, count: int, full: bool) -> None:
        """Positions start..start+count-1 were written, by the full weights or not."""
        if full and start <= self.full_length:
            self.full_length = start + count
        else:
            self.full_length = min(self.full_length, start)

    def copy_prefix(self, other: "KVCache", length: int) -> None:
        """Take the first `length` positions of another cache (growing without losing them)."""
        self.k[:, :, :length] = other.k[:, :, :length]
        self.v[:, :, :length] = other.v[:, :, :length]
        self.length = length
        self.full_length = min(other.full_length, length)

"""Weights as data: the tensors one decoder layer and the whole model need.

A layer lives in one flat buffer (host store, device slot or resident copy alike) and
`LayerLayout.views` cuts the named tensors out of it, so moving a layer is a single copy and a
slot's views are built once. The MLP comes last in the buffer, so the attention weights plus the
first k neurons form a prefix: after Griffin reorders the neurons, a sparse step's weights are a
prefix of the layer's buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch

from ferry.model.config import ModelConfig


class Kind(str, Enum):
    """Which weights a forward pass uses: FULL, every MLP neuron (prefill, dense steps, the
    correction pass); SPARSE, only the selected neurons. Compares equal to its value."""

    FULL = "full"
    SPARSE = "sparse"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [q + 2 kv, H]: q, k, v stacked so one GEMV reads all three
    qkv_bias: torch.Tensor | None  # [q + 2 kv]
    o: torch.Tensor  # [H, q]
    mlp_norm: torch.Tensor  # [H]
    # MLP bundles [n, 3, H] whose outputs add up: for each neuron its gate row, up row and down
    # *column* side by side. Row-column bundling makes selecting neurons a gather of whole
    # contiguous rows. One part normally; two when the selected rows are resident on the device
    # and the complement arrives in a slot.
    mlp: tuple[torch.Tensor, ...]
    mlp_threshold: float | None = None  # CATS: skip neurons with |SiLU(gate)| below it


@dataclass(frozen=True)
class LayerLayout:
    """Where each tensor of a layer sits in the layer's flat buffer (MLP rows last)."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # everything before the MLP
    intermediate_size: int
    hidden_size: int

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "LayerLayout":
        h, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
        shapes = [("attn_norm", (h,)), ("qkv", (qkv, h))]
        if cfg.attention_bias:
            shapes.append(("qkv_bias", (qkv,)))
        shapes += [("o", (h, cfg.q_size)), ("mlp_norm", (h,))]
        return cls(tuple(shapes), cfg.intermediate_size, h)

    @property
    def mlp_offset(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def row_numel(self) -> int:
        """Elements of one MLP neuron's bundle row (gate, up, down column)."""
        return 3 * self.hidden_size

    def prefix_numel(self, rows: int) -> int:
        """Elements of the attention weights plus the first `rows` MLP neurons."""
        return self.mlp_offset + rows * self.row_numel

    @property
    def numel(self) -> int:
        return self.prefix_numel(self.intermediate_size)

    def bundle(self, flat: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Neurons lo..hi-1 of the MLP in a buffer laid out like a whole layer: [hi - lo, 3, H]."""
        start = self.mlp_offset + lo * self.row_numel
        return flat[start:start + (hi - lo) * self.row_numel].view(hi - lo, 3, self.hidden_size)

    def attention_views(self, flat: torch.Tensor) -> dict[str, torch.Tensor | None]:
        tensors, offset = {"qkv_bias": None}, 0
        for name, shape in self.shapes:
            size = math.prod(shape)
            tensors[name] = flat[offset:offset + size].view(shape)
            offset += size
        return tensors

    def views(self, flat: torch.Tensor, rows: int | None = None) -> LayerWeights:
        """Named views into a flat buffer holding the attention weights and `rows` neurons."""
        rows = self.intermediate_size if rows is None else rows
        return LayerWeights(**self.attention_views(flat), mlp=(self.bundle(flat, 0, rows),))


class LayerSource(Protocol):
    """Hands the forward pass each layer's weights, wherever they live (resident or streamed)."""

    def begin(self) -> None: ...

    def acquire(self, index: int) -> LayerWeights: ...

    def release(self, index: int) -> None: ...

    def end(self) -> None:
        """Called once the pass's logits are computed."""
        ...

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """Copy a small host tensor to the compute device (counted like every other copy)."""
        ...


@dataclass(frozen=True)
class ModelWeights:
    embed: torch.Tensor  # [V, H]; may stay in host memory (only a row per token is needed)
    layers: LayerSource
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; the embedding tensor itself when tied, or int8 (model.packed)

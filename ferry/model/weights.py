"""Weights as data: the tensors one decoder layer and the whole model need.

A layer lives in one flat buffer (host store, device slot or resident copy alike) and
`LayerLayout.views` cuts the named tensors out of it, so moving a layer is a single copy and a
slot's views are built once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ferry.model.config import ModelConfig


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [q + 2 kv, H]: q, k, v stacked so one GEMV reads all three
    qkv_bias: torch.Tensor | None  # [q + 2 kv]
    o: torch.Tensor  # [H, q]
    mlp_norm: torch.Tensor  # [H]
    # [n, 3, H]: for each MLP neuron its gate row, up row and down *column*, side by side.
    # Row-column bundling: selecting neurons (contextual sparsity) is then a gather of whole
    # contiguous rows, one per neuron, instead of three scattered reads with a strided column.
    mlp: torch.Tensor


@dataclass(frozen=True)
class LayerLayout:
    """Where each tensor of a layer sits in the layer's flat buffer."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "LayerLayout":
        h, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
        shapes = [("attn_norm", (h,)), ("qkv", (qkv, h))]
        if cfg.attention_bias:
            shapes.append(("qkv_bias", (qkv,)))
        shapes += [("o", (h, cfg.q_size)), ("mlp_norm", (h,)), ("mlp", (cfg.intermediate_size, 3, h))]
        return cls(tuple(shapes))

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    def views(self, flat: torch.Tensor) -> LayerWeights:
        """Named views into a flat [numel] buffer; no data is copied."""
        tensors, offset = {"qkv_bias": None}, 0
        for name, shape in self.shapes:
            size = math.prod(shape)
            tensors[name] = flat[offset:offset + size].view(shape)
            offset += size
        return LayerWeights(**tensors)


class LayerSource(Protocol):
    """Hands the forward pass each layer's weights, wherever they live (resident or streamed)."""

    def acquire(self, index: int) -> LayerWeights: ...

    def release(self, index: int) -> None: ...

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """Copy a small host tensor to the compute device (counted like every other copy)."""
        ...


class ResidentLayers:
    """Every layer already on the compute device."""

    def __init__(self, layers: list[LayerWeights], device: torch.device):
        self.layers, self.device = layers, device

    def acquire(self, index: int) -> LayerWeights:
        return self.layers[index]

    def release(self, index: int) -> None:
        pass

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device)


@dataclass(frozen=True)
class ModelWeights:
    embed: torch.Tensor  # [V, H]; may stay in host memory (only a row per token is needed)
    layers: LayerSource
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; the embedding tensor itself when tied

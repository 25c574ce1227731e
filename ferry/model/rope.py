"""Rotary position embeddings: the cos/sin tables for every position a run can reach.

Built once per run (the checkpoint's scaling included: linear or Llama 3.1's); the rotation
itself is `ferry.kernels.reference.apply_rope`.
"""

from __future__ import annotations

import math

import torch

from ferry.model.config import ModelConfig, RopeConfig


class Rope:
    """cos/sin tables for every position the KV cache can hold."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin  # [capacity, head_dim]


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32 (as the reference models compute them), with the checkpoint's scaling applied."""
    inv = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        return _llama3_scale(inv, rope)
    return inv


def _llama3_scale(inv: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    ramp = (1 - smooth) * inv / rope.factor + smooth * inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, ramp, scaled)


def rope_tables(
    rope: RopeConfig, head_dim: int, length: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [length, head_dim] for positions 0..length-1, built once per run."""
    inv = rope_inv_freq(rope, head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)  # [length, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


def rope_for(cfg: ModelConfig, length: int, dtype: torch.dtype, device: torch.device | str) -> Rope:
    """The tables of a model for positions 0..length-1."""
    return Rope(*rope_tables(cfg.rope, cfg.head_dim, length, dtype, device))

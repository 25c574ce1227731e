"""Plain-torch reference ops for the decoder: the numerics every faster kernel must reproduce."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ferry.model.config import RopeConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as the reference models do."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def bundled_mlp(
    x: torch.Tensor, bundle: torch.Tensor, threshold: float | None = None, observe=None,
) -> torch.Tensor:
    """down(SiLU(gate(x)) * up(x)) for x [S, H] over a bundle [n, 3, H] of n neurons.

    Works for any subset of neurons: the MLP over all I neurons equals the sum of the MLPs over
    a partition of them (the selected rows plus their complement). With a CATS threshold, the
    neurons whose |SiLU(gate)| falls below it contribute nothing for that token. `observe(a, z)`
    sees the activations a = SiLU(gate) and z = a * up (selection and calibration use them).
    """
    a = F.silu(F.linear(x, bundle[:, 0]))  # [S, n]
    if threshold is not None:
        a = a * (a.abs() >= threshold)
    z = a * F.linear(x, bundle[:, 1])
    if observe is not None:
        observe(a, z)
    return torch.matmul(z, bundle[:, 2])  # [S, H]


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [heads, S, head_dim] by the tables for its S positions ([S, head_dim])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

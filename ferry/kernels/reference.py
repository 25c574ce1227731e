"""Plain-torch reference ops for the decoder: the numerics every faster kernel must reproduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    a, z = gated(F.linear(x, bundle[:, 0]), F.linear(x, bundle[:, 1]), threshold)  # [S, n]
    if observe is not None:
        observe(a, z)
    return torch.matmul(z, bundle[:, 2])  # [S, H]


def gated(gate: torch.Tensor, up: torch.Tensor, threshold: float | None = None) -> tuple:
    """The MLP's activations from its gate and up products: a = SiLU(gate), zeroed where |a| is
    under a CATS threshold, and z = a * up (what down_proj multiplies)."""
    a = F.silu(gate)
    if threshold is not None:
        a = a * (a.abs() >= threshold)
    return a, a * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [heads, S, head_dim] by the tables for its S positions ([S, head_dim]).

    x * cos + cat(-x2, x1) * sin, written half by half (no concatenated copy); each product and
    sum is rounded exactly as in that formula, so the result is bit-identical to it."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].sub_(x[..., half:] * sin[..., :half])
    out[..., half:].add_(x[..., :half] * sin[..., half:])
    return out

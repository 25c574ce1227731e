"""CATS / TEAL: per-token sparsity from the magnitude of a = SiLU(gate(x)).

Neurons whose |a| falls below a per-layer threshold are skipped for that token. The thresholds
are calibrated offline on sample text so that the requested fraction of activations is dropped.
"""

from __future__ import annotations

import torch

MAX_SAMPLES = 1 << 21  # activation values kept per layer for the quantile


def sample_abs(a: torch.Tensor, budget: int) -> torch.Tensor:
    """An evenly strided sample of |a| (at most `budget` values), fp32 on the CPU."""
    flat = a.detach().reshape(-1)
    step = max(1, flat.numel() // max(1, budget))
    return flat[::step].abs().float().cpu()


def threshold_for(samples: torch.Tensor, sparsity: float) -> float:
    """The |a| value below which a `sparsity` fraction of the samples fall."""
    if sparsity <= 0 or samples.numel() == 0:
        return 0.0
    k = min(samples.numel(), max(1, round(sparsity * samples.numel())))
    return float(samples.kthvalue(k).values)


def cats_mask(a: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which neurons a token keeps: |a| >= threshold (same shape as a)."""
    return a.abs() >= threshold

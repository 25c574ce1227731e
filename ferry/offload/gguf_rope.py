"""Llama 3.1's rope scaling, recovered from the `rope_freqs` tensor llama.cpp writes instead of
metadata (pure math; `gguf.py` folds the result into the converted config.json)."""

from __future__ import annotations

import numpy as np

from ferry.errors import FerryError


def rope_parameters_from_factors(factors: np.ndarray, theta: float, head_dim: int, source: str) -> dict | None:
    """The llama3 rope parameters whose per-frequency divisors are `factors`; None when all are 1.

    llama.cpp writes, for each inverse frequency, 1 (short wavelengths), `factor` (long ones) or
    1 / ((1 - s) / factor + s) on the ramp between, with s = (L / wavelength - low) / (high - low).
    s is linear in 1 / wavelength, so the ramp points give L / (high - low) and low / (high - low);
    only their ratios matter, so low_freq_factor is taken as 1. The fit is checked against every
    factor: a tensor that is not llama3 scaling is refused rather than used wrongly.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv.shape:
        raise FerryError(f"{source}: rope_freqs has {factors.size} values, expected {inv.size} (head_dim {head_dim})")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())
    x = inv / (2 * np.pi)  # 1 / wavelength
    ramp = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if ramp.sum() >= 2:
        s = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x[ramp], s, 1)
    else:  # no ramp to fit: put s = 0 and s = 1 between the neighbouring scaled and unscaled points
        lo = x[factors >= factor * (1 - 1e-6)].max()
        unscaled = x[factors <= 1 + 1e-6]
        hi = unscaled.min() if unscaled.size else lo * 8
        if ramp.any():  # one ramp point: the line through it and s = 0 a third of the way from lo
            x1, s1 = x[ramp][0], (1 / factors[ramp][0] - 1 / factor) / (1 - 1 / factor)
            x0 = lo * (x1 / lo) ** (1 / 3)
        else:
            x0, x1, s1 = lo * (hi / lo) ** (1 / 3), lo * (hi / lo) ** (2 / 3), 1.0
        slope = s1 / (x1 - x0)
        intercept = -slope * x0
    high = 1 - 1 / intercept if intercept < 0 else 0.0
    old = slope * (high - 1)  # original_max_position_embeddings with low_freq_factor 1
    tidy = {"rope_type": "llama3", "factor": round(factor, 6), "low_freq_factor": 1.0,
            "high_freq_factor": round(high, 3), "original_max_position_embeddings": int(round(old))}
    k = max(1, round(old)) / old  # scaling old, low and high together leaves every factor as it is
    exact = {**tidy, "low_freq_factor": k, "high_freq_factor": float(high * k),
             "original_max_position_embeddings": max(1, int(round(old)))}
    for params in (tidy, exact):
        if high > 1 and np.allclose(_llama3_factors(inv, params), factors, rtol=1e-4, atol=1e-6):
            return params
    raise FerryError(f"{source}: rope_freqs does not follow llama3 rope scaling; ferry cannot use it")


def _llama3_factors(inv: np.ndarray, p: dict) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 parameters `p` (the inverse of the fit above)."""
    wavelen = 2 * np.pi / inv
    L, factor = p["original_max_position_embeddings"], p["factor"]
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    smooth = (L / wavelen - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < L / high, 1.0, np.where(wavelen > L / low, factor, ramp))

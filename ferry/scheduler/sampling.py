"""Next-token choice from logits: greedy at temperature 0, else temperature + nucleus (top-p)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ferry.errors import SettingError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SettingError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SettingError("top_p", f"must be in (0, 1], got {self.top_p}")
        # torch.Generator.manual_seed takes 64 bits (negatives wrap); beyond them it overflows.
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise SettingError("seed", f"must be an integer in [0, 2**64), got {self.seed}")


class Sampler:
    """Holds the random generator so a seed reproduces the whole sequence."""

    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.generator = torch.Generator()
        if cfg.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(cfg.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (fp32, any device) -> token id."""
        if self.cfg.temperature == 0:
            return int(logits.argmax())
        probs = tempered_probs(logits, self.cfg.temperature)
        if probs is None:  # non-finite logits: nothing to sample from, take the most likely
            return int(logits.argmax())
        if self.cfg.top_p < 1:
            probs = top_p_filter(probs, self.cfg.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor | None:
    """softmax(logits / temperature) [V] fp64, or None when it has no meaning.

    The largest logit is subtracted before dividing, in float64, so a tiny temperature (1e-300)
    sends the rest to -inf (probability 0) instead of overflowing everything to inf and NaN."""
    scaled = logits.double().cpu()
    scaled = (scaled - scaled.max()) / temperature
    probs = torch.softmax(scaled, dim=-1)
    if not bool(torch.isfinite(probs).all()) or not probs.sum() > 0:
        return None
    return probs


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)

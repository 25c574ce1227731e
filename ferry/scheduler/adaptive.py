"""Adaptive correction: end a chunk of drafts when the sparse model itself is unsure.

With a fixed period every draft after an early rejection is wasted. Instead, the sparse model
drafts until its confidence in the token it just chose falls below P (or K drafts), then the full
pass checks the chunk.

Choosing P automatically. Every checked draft up to the first rejection is an observation
(confidence, kept?). Treating drafts as independent, with the observed distribution of confidence
and the acceptance rate in each confidence bin, a threshold P gives per chunk

    E[drafts]    = sum_{i<K} F^i                         F = Pr(conf >= P)
    E[committed] = 1 + (A_hi + A_lo) * sum_{i<K} A_hi^i  A_hi = Pr(conf >= P and kept),
                                                         A_lo = Pr(conf < P and kept)

and the cost per committed token is (E[drafts] * c + 1) / E[committed], where c is the cost of a
sparse step relative to a full pass for the current plan: the ratio of link bytes when the full
pass streams weights, otherwise d_sparse (the fraction of parameters a sparse step reads). The
tuner picks the P on a 0.01 grid that minimises it, re-deciding after every chunk once it has enough
observations.
"""

from __future__ import annotations

import torch

GRID = tuple(i / 100 for i in range(100))  # candidate thresholds 0.00 .. 0.99
BINS = 100
WARMUP = 24  # observations before the tuner trusts its estimates
START_P = 0.5


def draft_confidence(logits: torch.Tensor, token: int, signal: str = "prob") -> float:
    """How sure the sparse model is of `token` (higher is surer), in [0, 1].

    prob: its probability; margin: top-1 minus top-2 probability; entropy: 1 - H / log(V).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if signal == "prob":
        return float(probs[token])
    if signal == "margin":
        top = torch.topk(probs, 2).values
        return float(top[0] - top[1])
    if signal == "entropy":
        h = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
        return float(1 - h / torch.log(torch.tensor(float(probs.numel()))))
    raise ValueError(f"unknown confidence signal {signal!r}")


def expected_cost(p: float, counts: torch.Tensor, kept: torch.Tensor, k: int, c: float) -> float:
    """Cost per committed token of threshold p (see the module docstring); counts/kept per bin."""
    total = float(counts.sum())
    if total == 0:
        return float("inf")
    hi = torch.arange(BINS) >= int(p * BINS)
    f = float(counts[hi].sum()) / total
    a_hi = float(kept[hi].sum()) / total
    a_lo = float(kept[~hi].sum()) / total
    drafts = sum(f ** i for i in range(k))
    committed = 1 + (a_hi + a_lo) * sum(a_hi ** i for i in range(k))
    return (drafts * c + 1) / committed


class ConfidenceTuner:
    """Running acceptance statistics by confidence, and the threshold they make cheapest."""

    def __init__(self, max_drafts: int, cost_ratio: float, fixed: float | None = None):
        self.max_drafts, self.cost_ratio, self.fixed = max_drafts, cost_ratio, fixed
        self.counts = torch.zeros(BINS)
        self.kept = torch.zeros(BINS)
        self.p = START_P if fixed is None else fixed

    def threshold(self) -> float:
        return self.p

    def observe(self, confidences: list[float], kept: int) -> None:
        """A checked chunk: the drafts' confidences and how many leading drafts were kept."""
        for i, conf in enumerate(confidences[: kept + 1]):  # later drafts were never judged
            b = min(BINS - 1, int(conf * BINS))
            self.counts[b] += 1
            self.kept[b] += i < kept
        if self.fixed is None and self.counts.sum() >= WARMUP:
            costs = [expected_cost(p, self.counts, self.kept, self.max_drafts, self.cost_ratio) for p in GRID]
            self.p = GRID[min(range(len(GRID)), key=costs.__getitem__)]

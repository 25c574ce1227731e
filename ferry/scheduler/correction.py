"""Sparse decoding with periodic full-weight correction (the Sirius method).

Each chunk: the sparse model drafts up to K-1 tokens after the last committed token t0; the full
model runs once over t0 and the drafts at their positions, rewriting their KV entries; the longest
prefix of drafts it finds likely is kept, and the full model's own next token follows it (a
correction after a rejection, a bonus token when all were kept). The KV cache is rolled back to
just after the kept prefix. Only verified tokens are ever yielded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ferry.errors import FerryError
from ferry.offload.streaming import FULL, SPARSE
from ferry.scheduler.adaptive import ConfidenceTuner, draft_confidence
from ferry.scheduler.decode import DecodeStats, Passes, Sampler, _finish

ACCEPT_TEMPERATURE = 0.6  # the full model's probabilities for acceptance are taken at this temperature
MODES = ("dense", "sparse", "sirius")
ACCEPT_RULES = ("threshold", "strict")
SIGNALS = ("prob", "margin", "entropy")


@dataclass(frozen=True)
class CorrectionConfig:
    mode: str = "dense"  # dense, sparse (no correction) or sirius (sparse + correction)
    period: int = 16  # K: one full pass per at most K committed tokens
    threshold: float = 0.1  # absolute probability a draft needs under the full model
    accept: str = "threshold"  # or strict: a draft must equal the full model's argmax
    adaptive: bool = False  # period "auto": end a chunk when the sparse model is unsure
    draft_confidence: float | None = None  # adaptive: that confidence P; None chooses it
    signal: str = "prob"  # adaptive: prob, margin or entropy (see adaptive.draft_confidence)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FerryError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.period < 1:
            raise FerryError(f"--period must be at least 1, got {self.period}")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold <= 1):
            raise FerryError(f"--threshold must be a probability in [0, 1], got {self.threshold}")
        if self.accept not in ACCEPT_RULES:
            raise FerryError(f"--accept must be threshold or strict, got {self.accept!r}")
        p = self.draft_confidence
        if p is not None and not (math.isfinite(p) and 0 <= p <= 1):
            raise FerryError(f"--draft-confidence must be in [0, 1], got {p}")
        if self.signal not in SIGNALS:
            raise FerryError(f"confidence signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}")


def accepted_prefix(full_logits: torch.Tensor, drafts: list[int], cfg: CorrectionConfig) -> int:
    """How many leading drafts to keep. full_logits[i] [V] is the full model's prediction for
    drafts[i] (made after the tokens before it)."""
    if not drafts:
        return 0
    target = torch.tensor(drafts, device=full_logits.device)
    rows = full_logits[: len(drafts)]
    if cfg.accept == "strict":
        ok = rows.argmax(dim=-1) == target
    else:
        probs = torch.softmax(rows / ACCEPT_TEMPERATURE, dim=-1)
        ok = probs.gather(1, target[:, None])[:, 0] >= cfg.threshold
    bad = (~ok).nonzero()
    return int(bad[0]) if len(bad) else len(drafts)


def decode_sirius(passes: Passes, first: int, max_new: int, sample: Sampler,
                  stop_ids: frozenset[int], stats: DecodeStats, cfg: CorrectionConfig,
                  tuner: ConfidenceTuner | None = None) -> Iterator[int]:
    """tuner (adaptive period): drafting stops after a draft whose confidence is under its
    threshold; it learns from every checked chunk."""
    cache = passes.cache
    token, produced = first, 1
    yield token
    while not _finish(stats, token, produced, max_new, cache, stop_ids):
        t0 = time.perf_counter()
        start = cache.length  # `token` goes here; drafts follow
        room = cache.capacity - start  # positions this chunk may write, token included
        n_drafts = min(cfg.period - 1, max_new - produced, room - 1)
        passes.expect([SPARSE] * n_drafts + [FULL] + [SPARSE])  # prefetch knows what comes
        drafts: list[int] = []
        confidences: list[float] = []
        unsure_below = tuner.threshold() if tuner else 0.0
        last = token
        for _ in range(n_drafts):
            logits = passes.sparse_step(last)
            last = sample(logits)
            drafts.append(last)
            if last in stop_ids:  # nothing is drafted past a stop token
                break
            if tuner:
                confidences.append(draft_confidence(logits, last, cfg.signal))
                if confidences[-1] < unsure_below:
                    break
        chunk = torch.tensor([token, *drafts], dtype=torch.long, device=passes.step_input.device)
        passes.expect([FULL] + [SPARSE])
        full_logits = passes.full(chunk, start)  # [1 + drafts, V]
        kept = accepted_prefix(full_logits, drafts, cfg)
        if tuner:
            tuner.observe(confidences, kept)
        cache.rollback(start + 1 + kept)  # token and the kept drafts now hold full-model KV
        next_token = sample(full_logits[kept]) if produced + kept < max_new else None
        stats.decode_s += time.perf_counter() - t0
        stats.steps += len(drafts) + 1
        stats.sparse_steps += len(drafts)
        stats.full_passes += 1
        stats.drafts += len(drafts)
        stats.accepted += kept
        stats.corrections += kept < len(drafts)
        for token in drafts[:kept]:
            produced += 1
            yield token
            if token in stop_ids:
                break
        if token in stop_ids or next_token is None:
            continue  # _finish records stop or length
        token = next_token
        produced += 1
        yield token

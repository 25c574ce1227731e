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
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ferry.errors import FerryError
from ferry.scheduler.adaptive import ConfidenceTuner, draft_confidence
from ferry.scheduler.decode import DecodeStats, Passes, Sampler, _finish
from ferry.scheduler.schedule import spread

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
    speculate: bool = True  # draft on during a streaming full pass (when the sparse set is resident)

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


@dataclass
class Chunk:
    """A committed token at `start` and the sparse drafts that follow it, awaiting a full pass."""

    start: int  # position of the committed head token
    last: int  # the token the next sparse step extends
    limit: int  # drafts allowed (period, max new tokens, context)
    drafts: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    stopped: bool = False  # a stop token or an unsure draft ended drafting

    def can_draft(self) -> bool:
        return not self.stopped and len(self.drafts) < self.limit


def draft_limit(cfg: CorrectionConfig, max_new: int, produced: int, capacity: int, start: int) -> int:
    """Drafts a chunk headed at `start` may hold: K-1, fewer near max_new or the context end."""
    return max(0, min(cfg.period - 1, max_new - produced, capacity - start - 1))


class Drafter:
    """Runs sparse steps for a chunk and records their confidences (adaptive period)."""

    def __init__(self, passes: Passes, sample: Sampler, stop_ids: frozenset[int], stats: DecodeStats,
                 cfg: CorrectionConfig, tuner: ConfidenceTuner | None):
        self.passes, self.sample, self.stop_ids, self.stats = passes, sample, stop_ids, stats
        self.cfg, self.tuner = cfg, tuner
        self.unsure_below = 0.0

    def step(self, chunk: Chunk) -> None:
        logits = self.passes.sparse_step(chunk.last)
        chunk.last = self.sample(logits)
        chunk.drafts.append(chunk.last)
        self.stats.steps += 1
        self.stats.sparse_steps += 1
        if chunk.last in self.stop_ids:  # nothing is drafted past a stop token
            chunk.stopped = True
        elif self.tuner:
            chunk.confidences.append(draft_confidence(logits, chunk.last, self.cfg.signal))
            chunk.stopped = chunk.confidences[-1] < self.unsure_below

    def fill(self, chunk: Chunk) -> None:
        while chunk.can_draft():
            self.step(chunk)

    def continuation(self, chunk: Chunk, layers: int) -> Callable[[int], None]:
        """`between` for a full pass: after each layer, the speculative steps due there."""
        counts = spread(chunk.limit, layers)

        def between(layer: int) -> None:
            for _ in range(counts[layer]):
                if chunk.can_draft():
                    self.step(chunk)
                    self.stats.speculative_steps += 1
        return between


def decode_sirius(passes: Passes, first: int, max_new: int, sample: Sampler,
                  stop_ids: frozenset[int], stats: DecodeStats, cfg: CorrectionConfig,
                  tuner: ConfidenceTuner | None = None, speculate: bool = False,
                  layers: int = 1) -> Iterator[int]:
    """tuner (adaptive period): drafting stops after a draft whose confidence is under its
    threshold; it learns from every checked chunk.

    speculate (the sparse set is resident, the full pass streams): the sparse model also drafts
    the token after the chunk (s0) before the pass, and while the pass streams its `layers`
    layers it goes on drafting the next chunk from s0. When the pass accepts every draft and s0,
    s0 is committed in place of the bonus token and the new drafts form the next chunk;
    otherwise they are discarded and the cache rolled back, as without speculation.
    """
    cache, draft = passes.cache, Drafter(passes, sample, stop_ids, stats, cfg, tuner)
    token, produced = first, 1
    yield token
    chunk: Chunk | None = None  # drafts a speculative continuation carried over
    while not _finish(stats, token, produced, max_new, cache, stop_ids):
        t0 = time.perf_counter()
        draft.unsure_below = tuner.threshold() if tuner else 0.0
        if chunk is None:
            start = cache.length
            chunk = Chunk(start, token, draft_limit(cfg, max_new, produced, cache.capacity, start))
            passes.expect(["sparse"] * chunk.limit + ["full", "sparse"])  # prefetch knows what comes
            draft.fill(chunk)
        start, n = chunk.start, len(chunk.drafts)
        nxt, between = None, None
        after = draft_limit(cfg, max_new, produced + n + 1, cache.capacity, start + n + 1)
        if speculate and n and not chunk.stopped and after:  # after > 0: s0 is not the last token
            chunk.limit += 1
            draft.step(chunk)  # s0, checked by this pass like a draft
            nxt = Chunk(start + n + 1, chunk.last, 0 if chunk.stopped else after)
            between = draft.continuation(nxt, layers)
        tokens = torch.tensor([token, *chunk.drafts[:n]], dtype=torch.long, device=passes.step_input.device)
        passes.expect(["full", "sparse"])
        full_logits = passes.full(tokens, start, between)  # [1 + n, V]
        kept = accepted_prefix(full_logits, chunk.drafts, cfg)
        if tuner:
            tuner.observe(chunk.confidences, kept)
        stats.steps += 1
        stats.full_passes += 1
        stats.drafts += len(chunk.drafts)
        stats.accepted += kept
        stats.corrections += kept < n
        committed = chunk.drafts[:kept]
        if nxt is not None and kept == n + 1:  # s0 accepted: the continuation stands
            stats.speculative_kept += 1
            cache.length = nxt.start + len(nxt.drafts)  # the continuation's KV entries
            next_token, chunk = None, nxt
        else:
            kept = min(kept, n)
            cache.rollback(start + 1 + kept)  # token and the kept drafts now hold full-model KV
            next_token = sample(full_logits[kept]) if produced + kept < max_new else None
            committed, chunk = chunk.drafts[:kept], None
        stats.decode_s += time.perf_counter() - t0
        for token in committed:
            produced += 1
            yield token
            if token in stop_ids:
                break
        if token in stop_ids or next_token is None:
            continue  # _finish records stop or length; or the continuation goes on
        token = next_token
        produced += 1
        yield token

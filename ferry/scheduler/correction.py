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

from ferry.errors import SettingError
from ferry.model.weights import Kind
from ferry.scheduler.adaptive import ConfidenceTuner
from ferry.scheduler.decode import DecodeStats, Passes, Sampler, finished
from ferry.scheduler.drafting import Chunk, Drafter, draft_limit

ACCEPT_TEMPERATURE = 0.6  # the full model's probabilities for acceptance are taken at this temperature
MODES = ("dense", "sparse", "sirius")
ACCEPT_RULES = ("threshold", "strict")
SIGNALS = ("prob", "margin", "entropy")


@dataclass(frozen=True)
class CorrectionConfig:
    mode: str | None = None  # dense, sparse (no correction), sirius (sparse + correction); None:
    # sirius when sparsity > 0, else dense (FerryConfig resolves it)
    period: int = 16  # K: one full pass per at most K committed tokens
    threshold: float = 0.1  # absolute probability a draft needs under the full model
    accept: str = "threshold"  # or strict: a draft must equal the full model's argmax
    adaptive: bool = False  # period "auto": end a chunk when the sparse model is unsure
    draft_confidence: float | None = None  # adaptive: that confidence P; None chooses it
    signal: str = "prob"  # adaptive: prob, margin or entropy (see adaptive.draft_confidence)
    speculate: bool = True  # draft on during a streaming full pass (when the sparse set is resident)

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise SettingError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.period, int) or self.period < 1:
            raise SettingError("max_period" if self.adaptive else "period", f"must be at least 1, got {self.period!r}")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold <= 1):
            raise SettingError("threshold", f"must be a probability in [0, 1], got {self.threshold}")
        if self.accept not in ACCEPT_RULES:
            raise SettingError("accept", f"must be threshold or strict, got {self.accept!r}")
        p = self.draft_confidence
        if p is not None and not (math.isfinite(p) and 0 <= p <= 1):
            raise SettingError("draft_confidence", f"must be in [0, 1], got {p}")
        if p is not None and not self.adaptive:
            raise SettingError("draft_confidence", "needs period auto")
        if self.signal not in SIGNALS:
            raise SettingError("signal", f"must be one of {', '.join(SIGNALS)}, got {self.signal!r}")


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
                  tuner: ConfidenceTuner | None = None, speculate: bool = False,
                  layers: int = 1) -> Iterator[int]:
    """Committed tokens, `first` (the prefill's) included.

    tuner (adaptive period): drafting stops after a draft whose confidence is under its
    threshold; it learns from every checked chunk. speculate (the sparse set is resident, the
    full pass streams its `layers` layers): see `ferry.scheduler.drafting`.
    """
    cache, drafter = passes.cache, Drafter(passes, sample, stop_ids, stats, cfg.signal, tuner)
    token, produced = first, 1
    yield token
    carried: Chunk | None = None  # the next chunk, drafted during the last pass and kept
    while not finished(stats, token, produced, max_new, cache, stop_ids):
        t0 = time.perf_counter()
        drafter.new_cycle()
        # 1. Draft: up to K-1 sparse tokens after the last committed one.
        chunk = carried or drafter.draft(token, cache.length, draft_limit(
            cfg.period, max_new, produced, cache.capacity, cache.length))
        # 2. Speculate: s0 now, the next chunk between the layers of the full pass.
        n = len(chunk.drafts)
        room = draft_limit(cfg.period, max_new, produced + n + 1, cache.capacity, chunk.after)
        nxt = drafter.speculate(chunk, room) if speculate else None
        # 3. Verify: one full pass over the head and the drafts rewrites their KV entries.
        tokens = torch.tensor([chunk.head, *chunk.drafts], dtype=torch.long, device=passes.step_input.device)
        passes.expect([Kind.FULL, Kind.SPARSE])
        logits = passes.full(tokens, chunk.start, nxt and drafter.continuation(nxt, layers))  # [1 + n, V]
        # 4. Accept the longest likely prefix of what the pass judged.
        kept = accepted_prefix(logits, chunk.checked, cfg)
        record_pass(stats, tuner, chunk, kept)
        # 5. Commit: the continuation stands, or roll back and add the full model's own token.
        if nxt is not None and kept == n + 1:
            stats.speculative_kept += 1
            commit, carried = chunk.checked, nxt
            cache.length = nxt.cached
        else:
            cache.rollback(chunk.start + 1 + kept)
            commit, carried = chunk.drafts[:kept], None
            if produced + kept < max_new:  # a correction after a rejection, else a bonus token
                commit.append(sample(logits[kept]))
        stats.decode_s += time.perf_counter() - t0
        # 6. Hand out what was committed, up to a stop token; the last one heads the next chunk.
        commit = until_stop(commit, stop_ids)
        produced += len(commit)
        yield from commit
        token = commit[-1]


def until_stop(tokens: list[int], stop_ids: frozenset[int]) -> list[int]:
    """The tokens up to and including the first stop token."""
    end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokens[:end]


def record_pass(stats: DecodeStats, tuner: ConfidenceTuner | None, chunk: Chunk, kept: int) -> None:
    """Count one checked chunk (and let the adaptive period learn from it)."""
    if tuner:
        tuner.observe(chunk.confidences, kept)
    checked = chunk.checked
    stats.steps += 1
    stats.full_passes += 1
    stats.drafts += len(checked)
    stats.accepted += kept
    stats.corrections += kept < len(chunk.drafts)

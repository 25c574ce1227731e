"""Drafting for the correction loop: the sparse model proposes a chunk of tokens.

A `Chunk` is a committed head token and the drafts after it, awaiting one full pass. With
speculation the sparse model also drafts the token after the chunk (`speculative`, s0) before
the pass, and while the pass streams it drafts the next chunk, headed by s0, between the pass's
layers (`Drafter.continuation`). The full pass checks s0 like a draft: when it accepts every
draft and s0, the next chunk is already drafted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ferry.model.weights import Kind
from ferry.scheduler.adaptive import ConfidenceTuner, draft_confidence
from ferry.scheduler.decode import DecodeStats, Passes, Sampler
from ferry.scheduler.schedule import spread


@dataclass
class Chunk:
    """A committed token at `start` and the sparse drafts that follow it."""

    start: int  # position of the committed head token
    head: int  # that token
    limit: int  # drafts allowed (period, max new tokens, context)
    drafts: list[int] = field(default_factory=list)
    speculative: int | None = None  # s0: the token after the drafts, drafted before the pass
    confidences: list[float] = field(default_factory=list)  # adaptive period: of drafts and s0
    stopped: bool = False  # a stop token or an unsure draft ended drafting

    @property
    def last(self) -> int:
        """The token the next sparse step extends."""
        if self.speculative is not None:
            return self.speculative
        return self.drafts[-1] if self.drafts else self.head

    @property
    def checked(self) -> list[int]:
        """What the full pass judges: the drafts, then s0 when there is one."""
        return self.drafts + ([] if self.speculative is None else [self.speculative])

    @property
    def after(self) -> int:
        """The position after the last draft (where s0 sits)."""
        return self.start + 1 + len(self.drafts)

    @property
    def cached(self) -> int:
        """Cache length once sparse steps have drafted it: the head and every draft but the last
        have KV entries (the last one's is written by the step after it, or the full pass)."""
        return self.start + len(self.drafts)

    def can_draft(self) -> bool:
        return not self.stopped and len(self.drafts) < self.limit


def draft_limit(period: int, max_new: int, produced: int, capacity: int, start: int) -> int:
    """Drafts a chunk headed at `start` may hold: K-1, fewer near max_new or the context end."""
    return max(0, min(period - 1, max_new - produced, capacity - start - 1))


class Drafter:
    """Runs sparse steps for chunks and records their confidences (adaptive period)."""

    def __init__(self, passes: Passes, sample: Sampler, stop_ids: frozenset[int], stats: DecodeStats,
                 signal: str, tuner: ConfidenceTuner | None):
        self.passes, self.sample, self.stop_ids, self.stats = passes, sample, stop_ids, stats
        self.signal, self.tuner = signal, tuner
        self.unsure_below = 0.0  # the tuner's threshold for the current chunk

    def new_cycle(self) -> None:
        """Take the tuner's current threshold for everything drafted until the next full pass."""
        self.unsure_below = self.tuner.threshold() if self.tuner else 0.0

    def next_token(self, chunk: Chunk) -> int:
        """One sparse step after chunk.last; marks the chunk stopped after a stop token or an
        unsure draft."""
        logits = self.passes.sparse_step(chunk.last)
        token = self.sample(logits)
        self.stats.steps += 1
        self.stats.sparse_steps += 1
        if token in self.stop_ids:  # nothing is drafted past a stop token
            chunk.stopped = True
        elif self.tuner:
            chunk.confidences.append(draft_confidence(logits, token, self.signal))
            chunk.stopped = chunk.confidences[-1] < self.unsure_below
        return token

    def draft(self, head: int, start: int, limit: int) -> Chunk:
        """A new chunk after the committed `head` at `start`, drafted up to its limit."""
        # Prefetch knows what comes: the drafts, the full pass, the next chunk's first step.
        self.passes.expect([Kind.SPARSE] * limit + [Kind.FULL, Kind.SPARSE])
        chunk = Chunk(start, head, limit)
        while chunk.can_draft():
            chunk.drafts.append(self.next_token(chunk))
        return chunk

    def speculate(self, chunk: Chunk, room: int) -> Chunk | None:
        """Draft s0 after the chunk and return the next chunk it heads (drafted later, during
        the full pass, by `continuation`); None when there is nothing to speculate on."""
        if not chunk.drafts or chunk.stopped or room == 0:
            return None
        chunk.speculative = self.next_token(chunk)
        return Chunk(chunk.after, chunk.speculative, 0 if chunk.stopped else room)

    def continuation(self, chunk: Chunk, layers: int) -> Callable[[int], None]:
        """`between` for a full pass: after each layer, the speculative steps due there."""
        counts = spread(chunk.limit, layers)

        def between(layer: int) -> None:
            for _ in range(counts[layer]):
                if chunk.can_draft():
                    chunk.drafts.append(self.next_token(chunk))
                    self.stats.speculative_steps += 1
        return between

"""Decode loops: dense, sparse-only, and (in correction.py) sparse with periodic correction.

Each loop yields committed token ids one at a time and fills a DecodeStats as it goes. The
first token comes from the prefill, which the engine runs (it also chooses the sparse set).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ferry.model.config import ModelConfig
from ferry.model.forward import forward, forward_layers, run_layers
from ferry.model.rope import Rope
from ferry.model.weights import ModelWeights
from ferry.model.kv_cache import KVCache
from ferry.scheduler.step_graphs import StepGraphs

Sampler = Callable[[torch.Tensor], int]


@dataclass
class DecodeStats:
    """Counters of one generation. Model time excludes time the consumer holds the generator."""

    prefill_s: float = 0.0
    reused_tokens: int = 0  # prompt tokens whose KV entries a previous sequence left (not prefilled)
    select_s: float = 0.0  # choosing and arranging the sparse set after the prefill
    prefill_bytes: int = 0  # host -> device during the prefill and the sparse set's arranging
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop", "length" or "context"
    steps: int = 0  # forward passes after the prefill (sparse steps + full passes)
    sparse_steps: int = 0
    full_passes: int = 0  # full-weight passes after the prefill (dense steps or corrections)
    drafts: int = 0  # sparse tokens checked by a full pass
    accepted: int = 0  # of those, kept
    corrections: int = 0  # full passes that replaced a rejected draft
    speculative_steps: int = 0  # sparse steps run during a full pass (counted in sparse_steps)
    speculative_kept: int = 0  # full passes whose speculative continuation was kept


class Passes:
    """The forward passes a decode loop can run: full weights, or the sparse selection.

    sparse_resident: the sparse weights are all on the device and bypass the fetch queue
    (a resident `PassView`), so sparse steps may run between the layers of a full pass, and the
    prefetch hints name full passes only.
    graphs: replays resident one-token steps (`StepGraphs`): sparse steps when sparse_resident,
    dense steps when `full_resident` (the full weights as a resident view) is given.
    """

    def __init__(self, cfg: ModelConfig, rope: Rope, cache: KVCache, full: ModelWeights,
                 sparse: ModelWeights, expect: Callable[[list[str]], None] = lambda kinds: None,
                 sparse_resident: bool = False, graphs: StepGraphs | None = None,
                 full_resident: ModelWeights | None = None):
        self.cfg, self.rope, self.cache = cfg, rope, cache
        self.full_weights, self.sparse_weights, self._expect = full, sparse, expect
        self.sparse_resident, self.graphs, self.full_resident = sparse_resident, graphs, full_resident
        self.step_input = torch.empty(1, dtype=torch.long, device=cache.k.device)  # reused

    def expect(self, kinds: list[str]) -> None:
        """Tell the prefetcher the kinds of the coming passes."""
        self._expect([k for k in kinds if k == "full" or not self.sparse_resident])

    def full(self, tokens: torch.Tensor, start: int,
             between: Callable[[int], None] | None = None) -> torch.Tensor:
        """Full weights over tokens at start..; logits for every position [S, V].
        between(layer), if given, runs after each layer (it may run resident sparse steps)."""
        steps = forward_layers(self.cfg, self.full_weights, self.rope, self.cache, tokens, start, all_logits=True)
        logits = run_layers(steps, between)
        self.cache.wrote(start, tokens.shape[0], full=True)
        return logits

    def full_step(self, token: int) -> torch.Tensor:
        if self.graphs is None or self.full_resident is None:
            self.step_input.fill_(token)
            return self.full(self.step_input, self.cache.length)[-1]
        start = self.cache.length
        logits = self.graphs.step("full", self.full_resident, token, start)
        self.cache.wrote(start, 1, full=True)
        return logits

    def sparse_step(self, token: int) -> torch.Tensor:
        """One token appended at the end of the cache through the sparse weights; logits [V]."""
        start = self.cache.length
        if self.graphs is not None and self.sparse_resident:
            logits = self.graphs.step("sparse", self.sparse_weights, token, start)
        else:
            self.step_input.fill_(token)
            logits = forward(self.cfg, self.sparse_weights, self.rope, self.cache, self.step_input,
                             start, all_logits=False)[-1]
        self.cache.wrote(start, 1, full=False)
        return logits


def finished(stats: DecodeStats, token: int, produced: int, max_new: int, cache: KVCache,
            stop_ids: frozenset[int]) -> bool:
    """Whether generation ends after `token` (recording why)."""
    if token in stop_ids:
        stats.finish_reason = "stop"
    elif produced >= max_new:
        stats.finish_reason = "length"
    elif cache.length >= cache.capacity:
        stats.finish_reason = "context"
    return bool(stats.finish_reason)


def decode_stepwise(passes: Passes, first: int, max_new: int, sample: Sampler,
                    stop_ids: frozenset[int], stats: DecodeStats, sparse: bool) -> Iterator[int]:
    """One token per pass: dense (full weights) or sparse-only (no correction)."""
    token, produced = first, 1
    yield token
    while not finished(stats, token, produced, max_new, passes.cache, stop_ids):
        t0 = time.perf_counter()
        logits = passes.sparse_step(token) if sparse else passes.full_step(token)
        token = sample(logits)
        stats.decode_s += time.perf_counter() - t0
        stats.steps += 1
        if sparse:
            stats.sparse_steps += 1
        else:
            stats.full_passes += 1
        produced += 1
        yield token

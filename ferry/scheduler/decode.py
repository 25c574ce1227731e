"""The dense decode loop: prefill, then one-token steps until a stop token, the limit or the context end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ferry.model.config import ModelConfig
from ferry.model.forward import Rope, decode_one, prefill
from ferry.model.weights import ModelWeights
from ferry.scheduler.kv_cache import KVCache


@dataclass
class DecodeTimes:
    """Seconds spent in model work, excluding time the consumer holds the generator."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop", "length" or "context"
    steps: int = field(default=0)


def decode_dense(
    cfg: ModelConfig, weights: ModelWeights, rope: Rope, cache: KVCache,
    prompt: torch.Tensor, max_new_tokens: int, sample: Callable[[torch.Tensor], int],
    stop_ids: frozenset[int], times: DecodeTimes,
) -> Iterator[int]:
    """Yield new token ids one at a time; `times` is filled in as it goes."""
    if max_new_tokens == 0:
        times.finish_reason = "length"
        return
    t0 = time.perf_counter()
    token = sample(prefill(cfg, weights, rope, cache, prompt)[-1])
    times.prefill_s = time.perf_counter() - t0
    step_input = torch.empty(1, dtype=torch.long, device=prompt.device)  # reused every step
    produced = 1
    while True:
        yield token
        if token in stop_ids:
            times.finish_reason = "stop"
            return
        if produced == max_new_tokens:
            times.finish_reason = "length"
            return
        if cache.length == cache.capacity:
            times.finish_reason = "context"
            return
        t0 = time.perf_counter()
        step_input.fill_(token)
        token = sample(decode_one(cfg, weights, rope, cache, step_input)[-1])
        times.decode_s += time.perf_counter() - t0
        times.steps += 1
        produced += 1

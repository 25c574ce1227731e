"""Resident decode steps replayed from CUDA graphs: one launch per token instead of ~15 per layer.

A step whose weights are all on the device (every layer resident for dense steps, the resident
sparse set for sparse steps) runs `ferry.model.static_step.decode_static`, captured once per
(kind of step, attention span) and replayed for every token: the token and its position are
written into device buffers first (with the embeddings in host memory, as a plan that streams
keeps them, the token's embedding row is copied in instead), and the span grows in buckets of
`BUCKET` positions. The graphs outlive a generation: the engine keeps them while its KV cache,
rope tables and weight buffers stay where they are (`LayerStore.epoch` counts the moves; a
Griffin reorder gathers rows in place on CUDA), so a conversation captures a few graphs, not a
few per request. Passes that stream (correction chunks, prefills) keep their copy stream and events and run as before.

`ENABLED`: None captures on CUDA; True also runs the static step on other devices, eagerly (no
capture: what the tests compare with `forward`'s step). Eagerly, each step also checks that the
weights it reads are what its graph would have baked in (addresses, shapes, thresholds), so a
change the epoch missed fails there instead of reading stale weights on a GPU.
"""

from __future__ import annotations

import warnings
from dataclasses import fields, is_dataclass
from typing import Callable, Iterator

import torch

from ferry.model.config import ModelConfig
from ferry.model.kv_cache import KVCache
from ferry.model.rope import Rope
from ferry.model.static_step import decode_static
from ferry.model.weights import ModelWeights
from ferry.offload.transfer import capture_graph

ENABLED: bool | None = None
BUCKET = 256  # attention spans are multiples of this (a graph each): at most this many masked keys


def available(device: torch.device) -> bool:
    return ENABLED is True or (ENABLED is None and device.type == "cuda")


def fingerprint(obj) -> Iterator:
    """What a captured graph bakes in from weights (tensors, tuples, dataclasses of them): each
    tensor's address, shape and strides, and every plain value (a CATS threshold, a row count)."""
    if isinstance(obj, torch.Tensor):
        yield obj.data_ptr(), tuple(obj.shape), obj.stride()
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from fingerprint(item)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from fingerprint(getattr(obj, f.name))
    elif isinstance(obj, (int, float, str)) or obj is None:
        yield obj


def weight_fingerprint(cfg: ModelConfig, weights: ModelWeights) -> tuple:
    """The fingerprint of everything a step reads through `weights`."""
    found = list(fingerprint((weights.embed, weights.norm, weights.lm_head)))
    for index in range(cfg.num_layers):
        found += fingerprint(weights.layers.acquire(index))
        weights.layers.release(index)
    return tuple(found)


def run_eagerly(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """capture_graph's contract without a graph: each replay reruns fn into the same output."""
    out = fn()
    return (lambda: out.copy_(fn())), out


class StepGraphs:
    """Captured decode steps over one KV cache and rope tables, valid while the store's `epoch`
    (weight buffers and what is read from them) stays as it was at construction."""

    def __init__(self, cfg: ModelConfig, rope: Rope, cache: KVCache, epoch: int = 0,
                 copy_rows: bool | None = None):
        self.cfg, self.rope, self.cache, self.epoch = cfg, rope, cache, epoch
        device = cache.k.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        # embeddings in host memory (a plan that streams keeps them there): the token's row is
        # copied into this buffer before each replay; copy_rows None: wherever that is so
        self.row = torch.zeros(1, cfg.hidden_size, dtype=cache.k.dtype, device=device)
        self.copy_rows = copy_rows
        self.device, self.eager = device, device.type != "cuda"
        self.pool = None if self.eager else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[str, int, bool], tuple[Callable[[], None], torch.Tensor]] = {}
        self.held: dict[tuple[str, int, bool], tuple] = {}  # eagerly: the weights' fingerprint at "capture"

    def _capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """A CUDA graph of fn on CUDA (eager replays if capture fails, with a warning); eager elsewhere."""
        if self.eager:
            return run_eagerly(fn)
        try:
            with torch.cuda.device(self.device):
                return capture_graph(fn, self.pool)
        except RuntimeError as err:
            warnings.warn(f"CUDA graph capture failed ({err}); this step runs without a graph", stacklevel=2)
            return run_eagerly(fn)

    def step(self, kind: str, weights: ModelWeights, token: int, start: int) -> torch.Tensor:
        """One token at position `start` through `weights` (all on the device); logits [V]."""
        if not 0 <= start < self.cache.capacity:  # the step writes the cache where pos says, unchecked
            raise ValueError(f"position {start} is outside the KV cache ({self.cache.capacity})")
        span = min(self.cache.capacity, (start // BUCKET + 1) * BUCKET)
        self.token.fill_(token)
        self.pos.fill_(start)
        from_row = weights.embed.device != self.device if self.copy_rows is None else self.copy_rows
        if from_row:
            weights.layers.upload(weights.embed[token].view(1, -1), out=self.row)
        key = (kind, span, from_row)
        if key not in self.graphs:
            row = self.row if from_row else None
            self.graphs[key] = self._capture(
                lambda: decode_static(self.cfg, weights, self.rope, self.cache, self.token, self.pos, span, row))
            if self.eager:
                self.held[key] = weight_fingerprint(self.cfg, weights)
        elif self.eager and weight_fingerprint(self.cfg, weights) != self.held[key]:
            raise RuntimeError(f"the {kind} weights changed since this step's graph was captured "
                               "(a change LayerStore.epoch did not count)")
        replay, logits = self.graphs[key]
        replay()
        self.cache.length = start + 1
        return logits[-1].clone()  # the graph rewrites its output at the next replay

"""Helpers shared by the test modules: tiny-model loading and budgets, and a mock model for the
correction loop (tests import these, never each other)."""

from __future__ import annotations

import torch

from ferry.model.kv_cache import KVCache
from ferry.model.rope import rope_for
from ferry.offload.checkpoint import open_checkpoint
from ferry.offload.cpu_links import InOrderLink
from ferry.offload.loader import load_model
from ferry.offload.planner import make_plan

V, EOS = 20, 19  # the mock model's vocabulary and stop token
PROMPTS = ["The capital of France", "def add(a, b):", "A quick brown fox", "Count to ten: one two"]


def streaming_budget(cfg, resident: int, depth: int, ctx: int = 64) -> int:
    """The device budget that leaves `resident` layers resident plus `depth` streaming slots."""
    p = make_plan(cfg, dtype_bytes=4, budget_bytes=1 << 40, host_available_bytes=1 << 40, ctx=ctx)
    fixed = p.kv_cache_bytes + p.workspace_bytes + p.norm_bytes + (p.lm_head_bytes or p.embed_bytes)
    return fixed + (resident + depth) * p.layer_bytes


def load_tiny(folder, capacity: int = 64, budget: int = 1 << 40, depth: int = 2, link=None,
              pipelined: bool = True, resident: int | None = None):
    """A tiny checkpoint in fp32 on the CPU; `resident` (or a small budget) makes layers stream."""
    ckpt = open_checkpoint(folder)
    cfg = ckpt.config
    if resident is not None:
        budget = streaming_budget(cfg, resident, depth, capacity)
    plan = make_plan(cfg, dtype_bytes=4, budget_bytes=budget, host_available_bytes=1 << 40,
                     ctx=capacity, prefetch_depth=depth).check()
    weights, _ = load_model(ckpt, plan, torch.float32, torch.device("cpu"), link or InOrderLink(),
                            pipelined=pipelined, progress=False)
    rope = rope_for(cfg, capacity, torch.float32, "cpu")
    return cfg, weights, rope, KVCache(cfg, capacity, torch.float32, torch.device("cpu"))


def prompt_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed))


# --- a mock model for the accept/rollback logic ---------------------------------------------------

class MockCache:
    def __init__(self, capacity: int, length: int):
        self.capacity, self.length = capacity, length

    def rollback(self, length: int) -> None:
        assert 0 <= length <= self.length
        self.length = length


class MockPasses:
    """Full model: at position p it predicts full[p]; sparse model predicts sparse[p]."""

    def __init__(self, full: dict[int, int], sparse: dict[int, int], capacity=100, prompt=5):
        self.full_pred, self.sparse_pred = full, sparse
        self.cache = MockCache(capacity, prompt)
        self.step_input = torch.empty(1, dtype=torch.long)
        self.checked: list[int] = []  # every token the full model has seen, by position
        self.checked_at: dict[int, int] = {}

    def expect(self, kinds) -> None:
        pass

    def sparse_step(self, token: int) -> torch.Tensor:
        pos = self.cache.length
        self.cache.length += 1
        return torch.nn.functional.one_hot(torch.tensor(self.sparse_pred.get(pos, 0)), V).float() * 10

    LAYERS = 4

    def full(self, tokens: torch.Tensor, start: int, between=None) -> torch.Tensor:
        assert start <= self.cache.length
        for i, t in enumerate(tokens.tolist()):
            self.checked_at[start + i] = t
        for layer in range(self.LAYERS):  # speculative steps write after the pass's positions
            if between is not None:
                between(layer)
        self.cache.length = start + len(tokens)
        rows = [self.full_pred.get(start + i, 0) for i in range(len(tokens))]
        return torch.nn.functional.one_hot(torch.tensor(rows), V).float() * 10


def truth(n=200, start=5):
    return {p: 1 + (p * 7) % 17 for p in range(start, start + n)}  # never EOS

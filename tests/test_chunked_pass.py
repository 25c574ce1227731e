"""Long passes run each layer in chunks of rows (`forward.PASS_CHUNK`): the same logits, KV
entries and observed activations as one chunk, for single sequences, batches whose segments
cross chunk boundaries, and sliding windows."""

from __future__ import annotations

import pytest
import torch

from ferry.model import forward as fw
from ferry.model.forward import Segment, forward, forward_batch
from ferry.model.kv_cache import KVCache
from helpers import load_tiny, prompt_ids


def run(folder, chunk: int, monkeypatch, start_tokens: int = 0):
    """A 40-token pass (after `start_tokens` already cached) at this chunk size: logits of every
    row, the cache, and the Griffin-style sums of squares of each layer's z over its rows."""
    monkeypatch.setattr(fw, "PASS_CHUNK", chunk)
    cfg, weights, rope, cache = load_tiny(folder)
    if start_tokens:
        forward(cfg, weights, rope, cache, prompt_ids(start_tokens, seed=3), 0, all_logits=False)
    sums = [torch.zeros(cfg.intermediate_size) for _ in range(cfg.num_layers)]
    calls = [0]

    def observe(layer, a, z):
        sums[layer] += z.float().pow(2).sum(dim=0)
        calls[0] += 1

    logits = forward(cfg, weights, rope, cache, prompt_ids(40), start_tokens, all_logits=True, observe_mlp=observe)
    return logits, cache, sums, calls[0], cfg


@pytest.mark.parametrize("family", ["llama3", "mistral"])  # mistral: a sliding window of 8
@pytest.mark.parametrize("start_tokens", [0, 5])
def test_chunked_pass_equals_one_chunk(family, start_tokens, tiny_model_dir, monkeypatch):
    folder = tiny_model_dir(family)
    whole, cache, sums, calls, cfg = run(folder, 1 << 20, monkeypatch, start_tokens)
    parts, cache_c, sums_c, calls_c, _ = run(folder, 7, monkeypatch, start_tokens)  # 6 chunks, the last of 5 rows
    assert calls == cfg.num_layers and calls_c == 6 * cfg.num_layers
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    end = start_tokens + 40
    torch.testing.assert_close(cache_c.k[:, :, :end], cache.k[:, :, :end], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache_c.v[:, :, :end], cache.v[:, :, :end], atol=1e-5, rtol=1e-5)
    assert cache_c.length == cache.length == end
    for a, b in zip(sums_c, sums):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_batch_segments_across_chunk_boundaries(tiny_model_dir, monkeypatch):
    """Three sequences of 9, 4 and 12 tokens in one pass, chunks of 5 rows: segments split and
    share chunks; each sequence's logits and cache equal its own unchunked pass."""
    folder = tiny_model_dir("llama3")
    cfg, weights, rope, _ = load_tiny(folder)
    feeds = [prompt_ids(n, seed=n) for n in (9, 4, 12)]

    def batch(chunk):
        monkeypatch.setattr(fw, "PASS_CHUNK", chunk)
        caches = [KVCache(cfg, 64, torch.float32, torch.device("cpu")) for _ in feeds]
        out = forward_batch(cfg, weights, rope, [Segment(c, t, 0) for c, t in zip(caches, feeds)], all_logits=True)
        return out, caches

    whole, caches = batch(1 << 20)
    parts, caches_c = batch(5)
    for a, b, ca, cb, t in zip(parts, whole, caches_c, caches, feeds):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ca.k[:, :, :len(t)], cb.k[:, :, :len(t)], atol=1e-5, rtol=1e-5)
        assert ca.length == cb.length == len(t)


def test_chunk_rows_places_each_segment():
    rows = [fw._Rows(None, 10, 0, 9, torch.arange(9.0)[:, None], -torch.arange(9.0)[:, None]),
            fw._Rows(None, 0, 9, 13, torch.arange(4.0)[:, None], -torch.arange(4.0)[:, None])]
    mid = fw.chunk_rows(rows, 5, 11)  # rows 5..8 of the first segment, 0..1 of the second
    assert [(r.start, r.lo, r.hi) for r in mid] == [(15, 0, 4), (0, 4, 6)]
    assert mid[0].cos[:, 0].tolist() == [5.0, 6.0, 7.0, 8.0] and mid[1].sin[:, 0].tolist() == [0.0, -1.0]
    assert fw.chunk_rows(rows, 13, 20) == []


def test_bf16_chunks_take_the_fused_one_row_ops(tiny_model_dir, monkeypatch):
    """In bf16 on the CPU a one-row chunk runs the fused decode kernels, which update the rows
    in place: a 9-row pass in chunks of 4, 4 and 1 gives the unchunked pass's logits."""
    import ferry
    from ferry.engine.generation import full_logits
    from ferry.kernels import decode_cpu

    engine = ferry.load(tiny_model_dir("llama3"), device="cpu", dtype="bf16", progress=False, reuse_prefix=False)
    ids = prompt_ids(9).tolist()
    whole = full_logits(engine.runtime, ids)
    calls = []
    real = decode_cpu._add_rms_norm
    monkeypatch.setattr(decode_cpu, "_add_rms_norm", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fw, "PASS_CHUNK", 4)
    parts = full_logits(engine.runtime, ids)
    assert len(calls) == 2 * engine.runtime.model.num_layers  # the last chunk's row, each layer's two norms
    torch.testing.assert_close(parts, whole, atol=3e-2, rtol=2e-2)

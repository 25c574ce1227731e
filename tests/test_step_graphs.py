"""Resident decode steps as a static step (`ferry.model.static_step`) replayed by `StepGraphs`:
on the CPU the step runs eagerly (no capture), and must equal `forward`'s decode step; on CUDA
the captured graphs must equal the uncaptured steps. The eager tests load on the CPU wherever
they run."""

from __future__ import annotations

import pytest
import torch

import ferry
from ferry.kernels import gemv
from ferry.model import packed
from ferry.model.forward import decode_one, prefill
from ferry.model.kv_cache import KVCache
from ferry.model.rope import rope_for
from ferry.model.static_step import decode_static
from ferry.scheduler import step_graphs
from ferry.model.quant import QuantConfig
from test_quant import budget

PROMPTS = ["The capital of France", "def add(a, b):"]
CPU = dict(dtype="fp32", device="cpu", ctx=64, progress=False)


def two_prefilled(folder, prompt: str):
    """An fp32 CPU engine and two KV caches, each prefilled with the prompt: one for the plain
    decode step, one for the static step. (engine, cfg, weights, rope, caches)"""
    engine = ferry.load(folder, **CPU)
    rt = engine.runtime
    cfg, weights, rope = rt.model, rt.weights, rope_for(rt.model, 64, torch.float32, "cpu")
    caches = [KVCache(cfg, 64, torch.float32, torch.device("cpu")) for _ in range(2)]
    for cache in caches:
        prefill(cfg, weights, rope, cache, torch.tensor(engine.encode(prompt)))
    return engine, cfg, weights, rope, caches


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])  # mistral: a sliding window of 8
def test_static_step_equals_the_decode_step(family, tiny_model_dir):
    _, cfg, weights, rope, caches = two_prefilled(tiny_model_dir(family), PROMPTS[0])
    token, pos = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    for step in range(12):  # past the window, and across a span boundary (16)
        start = caches[0].length
        token.fill_(7 + step)
        pos.fill_(start)
        want = decode_one(cfg, weights, rope, caches[0], token)
        got = decode_static(cfg, weights, rope, caches[1], token, pos, span=16 if start < 16 else 32)
        caches[1].length = start + 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].k[:, :, :caches[0].length], caches[0].k[:, :, :caches[0].length])


@pytest.fixture
def counted(monkeypatch):
    """Every capture and every replayed step, counted; buckets of 8 so generations cross spans."""
    seen = {"captures": [], "steps": 0}
    capture, step = step_graphs.StepGraphs._capture, step_graphs.StepGraphs.step

    def counted_capture(self, fn):
        seen["captures"].append(fn)
        return capture(self, fn)

    def counted_step(self, *args):
        seen["steps"] += 1
        return step(self, *args)
    monkeypatch.setattr(step_graphs, "BUCKET", 8)
    monkeypatch.setattr(step_graphs.StepGraphs, "_capture", counted_capture)
    monkeypatch.setattr(step_graphs.StepGraphs, "step", counted_step)
    return seen


def generate(engine, graphs: bool, prompt: str, n: int = 12):
    step_graphs.ENABLED = graphs
    try:
        return engine.generate(prompt, max_new_tokens=n, ignore_eos=True)
    finally:
        step_graphs.ENABLED = None


@pytest.mark.parametrize("options", [dict(), dict(sparsity=0.5, mode="sparse"),
                                     dict(sparsity=0.5, sparse_method="cats", mode="sparse"),
                                     dict(sparsity=0.5, accept="strict", period=4)])
def test_engine_with_replayed_steps_equals_plain_steps(options, tiny_model_dir, counted):
    engine = ferry.load(tiny_model_dir("llama3"), **CPU, **options)
    captures = []
    for prompt in PROMPTS:
        want = generate(engine, False, prompt)
        assert counted["steps"] == 0
        got = generate(engine, True, prompt)
        assert got.token_ids == want.token_ids and got.stats.sparse_steps == want.stats.sparse_steps
        # every one-token step replayed (the correction's chunks are not one-token steps)
        s = got.stats
        assert counted["steps"] == (s.sparse_steps if "period" in options else s.sparse_steps + s.full_passes)
        captures.append(len(counted["captures"]))
        counted["steps"], counted["captures"] = 0, []
    # spans of 8 positions: the first prompt (~6 tokens + 12) captures a few; the second keeps
    # them (same cache, weights gathered in place) and captures only a span the first never reached
    assert 2 <= captures[0] <= 4 and captures[1] < captures[0]
    if "period" in options:  # strict Sirius with replayed sparse steps still equals dense greedy
        dense = ferry.load(tiny_model_dir("llama3"), **CPU)
        assert got.token_ids == dense.generate(PROMPTS[-1], max_new_tokens=12, ignore_eos=True).token_ids


def test_graphs_are_recaptured_when_weights_move(tiny_model_dir, tmp_path, monkeypatch, counted):
    """Packed int4 layers (the CPU's kernel) are replaced by a Griffin reorder: the store's epoch
    moves and the next prompt captures afresh. Had it not moved, the eager check would fail."""
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    engine = ferry.load(tiny_model_dir("llama3-blocks"), **{**CPU, "dtype": "bf16"}, quant="int4", sparsity=0.5,
                        mode="sparse")
    store = engine.runtime.executor.store
    assert store.packed  # resident layers on the packed kernel
    generate(engine, True, PROMPTS[0], n=6)
    graphs, epoch = engine.runtime.context.graphs, store.epoch
    generate(engine, True, PROMPTS[1], n=6)
    assert store.epoch > epoch and engine.runtime.context.graphs is not graphs  # a fresh set
    reorder = type(store).reorder_neurons

    def reorder_uncounted(self, *args):  # a move the epoch misses
        before = self.epoch
        reorder(self, *args)
        self.epoch = before
    monkeypatch.setattr(type(store), "reorder_neurons", reorder_uncounted)
    with pytest.raises(RuntimeError, match="changed since"):
        generate(engine, True, PROMPTS[0], n=6)


def test_new_cats_thresholds_are_not_replayed_stale(tiny_model_dir, counted):
    """Thresholds are baked into a captured step: new ones move the epoch (a fresh set of
    graphs), and had they not, the eager check would see them."""
    engine = ferry.load(tiny_model_dir("llama3"), **CPU, sparsity=0.5, sparse_method="cats", mode="sparse")
    store = engine.runtime.executor.store
    generate(engine, True, PROMPTS[0], n=6)
    graphs = engine.runtime.context.graphs
    store.set_thresholds([t * 0.5 for t in store.thresholds])
    generate(engine, True, PROMPTS[0], n=6)
    assert engine.runtime.context.graphs is not graphs
    store.set_thresholds([t * 2 for t in store.thresholds])
    store.epoch -= 1  # a change the epoch misses
    with pytest.raises(RuntimeError, match="changed since"):
        generate(engine, True, PROMPTS[0], n=6)


def test_streamed_full_passes_are_not_replayed(tiny_model_dir, counted):
    folder = tiny_model_dir("llama3")
    engine = ferry.load(folder, **CPU, emulate_link_gbps=50.0,
                        prefetch_depth=1, sparsity=0.5,
                        gpu_memory=budget(folder, QuantConfig("none"), resident=0, depth=1, prefixes=4), mode="sirius",
                        accept="strict", period=4)
    assert engine.plan.streamed_layers and len(engine.plan.prefix_layers) == len(engine.plan.streamed_layers)
    want = generate(engine, False, PROMPTS[0])
    got = generate(engine, True, PROMPTS[0])
    assert got.token_ids == want.token_ids
    assert counted["steps"] == got.stats.sparse_steps > 0  # the resident sparse set's steps only


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter runs only where CUDA does not")
def test_records_in_place_with_replayed_steps_equal_the_reference(tiny_model_dir, tmp_path, monkeypatch, counted):
    """What CUDA runs for a quantized model: records read in place (Triton's interpreter here)
    inside the static step."""
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(packed, "ENABLED", False)
    monkeypatch.setattr(gemv, "BLOCK_R1", 128)
    engine = ferry.load(tiny_model_dir("qwen2"), **CPU, quant="int4",
                        sparsity=0.5, mode="sparse")
    want = generate(engine, False, PROMPTS[0], n=6)
    monkeypatch.setattr(gemv, "ENABLED", True)
    got = generate(engine, True, PROMPTS[0], n=6)
    assert got.token_ids == want.token_ids and counted["steps"] == 5


def test_graphs_setting_turns_them_off(tiny_model_dir, counted):
    engine = ferry.load(tiny_model_dir("llama3"), **CPU, cuda_graphs=False)
    generate(engine, True, PROMPTS[0], n=4)
    assert counted["steps"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize("options", [dict(), dict(sparsity=0.5, mode="sparse"), dict(quant="int4", sparsity=0.5)])
def test_cuda_graphs_equal_uncaptured_steps(options, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    engine = ferry.load(tiny_model_dir("llama3"), dtype="fp32", device="cuda", ctx=64, progress=False, **options)
    for prompt in PROMPTS:
        want = generate(engine, False, prompt)
        got = generate(engine, None, prompt)  # automatic: captured on CUDA
        assert got.token_ids == want.token_ids


def test_steps_from_copied_embedding_rows_equal_the_decode_step(tiny_model_dir):
    """A plan that streams keeps the embeddings in host memory: the step's input row is copied
    into the graphs' buffer (counted on the link) and the step starts from it, not from a
    lookup inside the graph. Forced here on the CPU, where the embeddings sit on the device."""
    engine, cfg, weights, rope, caches = two_prefilled(tiny_model_dir("llama3"), PROMPTS[1])
    rt = engine.runtime
    graphs = step_graphs.StepGraphs(cfg, rope, caches[1], copy_rows=True)
    before = rt.link.stats().bytes
    for step in range(5):
        token = 11 + step
        want = decode_one(cfg, weights, rope, caches[0], torch.tensor([token]))
        got = graphs.step("full", weights, token, caches[1].length)
        torch.testing.assert_close(got, want[-1], rtol=1e-5, atol=1e-5)
        assert torch.equal(graphs.row[0], weights.embed[token])
    assert rt.link.stats().bytes - before == 5 * cfg.hidden_size * 4  # one fp32 row a step
    assert list(graphs.graphs) == [("full", 64, True)]  # one "graph": the span (the whole cache), from rows


def test_static_step_starts_from_the_row_it_is_given(tiny_model_dir):
    _, cfg, weights, rope, caches = two_prefilled(tiny_model_dir("llama3"), PROMPTS[0])
    start = caches[0].length
    want = decode_one(cfg, weights, rope, caches[0], torch.tensor([42]))
    got = decode_static(cfg, weights, rope, caches[1], torch.tensor([7]), torch.tensor([start]), 64,
                        row=weights.embed[42].view(1, -1))  # token 7's id, token 42's row
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

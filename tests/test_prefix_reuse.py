"""Prefix reuse: a prompt that begins with the previous sequence prefills only what is new, and
its output equals a cold run's (fp32 tiny models: dense greedy, strict Sirius with Griffin)."""

from __future__ import annotations

import pytest
import torch

import ferry
from ferry.kernels.gather import moved_rows
from ferry.model.quant import QuantConfig
from ferry.offload.planner import make_plan
from helpers import streaming_budget

FIRST = "The capital of France is Paris. Count to ten: one two"
N = 12


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def two_turns(engine, cold, second_words: str = " three four five"):
    """Turn one, then a prompt that begins with turn one's text and answer; the same second
    prompt on a cold engine. Returns (turn one, turn two, cold turn two, second prompt)."""
    one = engine.generate(FIRST, max_new_tokens=N, chat=False, ignore_eos=True)
    second = FIRST + one.text + second_words
    two = engine.generate(second, max_new_tokens=N, chat=False, ignore_eos=True)
    cold.reset()
    return one, two, cold.generate(second, max_new_tokens=N, chat=False, ignore_eos=True), second


@pytest.mark.parametrize("ctx", [64, None])  # None: the cache grows between turns, keeping its prefix
def test_dense_second_turn_prefills_only_new_tokens(ctx, tiny_model_dir):
    folder = tiny_model_dir("llama3")
    engine = ferry.load(folder, dtype="fp32", ctx=ctx, progress=False)
    cold = ferry.load(folder, dtype="fp32", ctx=ctx, progress=False, reuse_prefix=False)
    one, two, want, second = two_turns(engine, cold)
    ids = engine.encode(second, chat=False)
    held = engine.encode(FIRST, chat=False) + one.token_ids[:-1]  # the last answer token has no KV yet
    expected = min(common_prefix(ids, held), len(ids) - 1)
    assert one.stats.reused_tokens == 0
    assert expected > one.stats.prompt_tokens  # the answer's tokens are reused too
    assert two.stats.reused_tokens == expected
    assert want.stats.reused_tokens == 0
    assert two.token_ids == want.token_ids


@pytest.mark.parametrize("stream", ["resident", "prefixes"])
def test_strict_griffin_second_turn_equals_cold_and_dense(stream, tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    options = dict(dtype="fp32", ctx=96, progress=False, sparsity=0.5, accept="strict", period=4)
    if stream == "prefixes":  # every layer streams; two keep their selected rows resident
        model = ferry.load(folder, dtype="fp32", ctx=96, progress=False).model
        prefix = make_plan(model, dtype_bytes=4, budget_bytes=1 << 40, host_available_bytes=1 << 40,
                           ctx=96, sparsity=0.5).prefix_bytes
        options["gpu_memory"] = streaming_budget(model, resident=0, depth=2, ctx=96) + 2 * prefix
    engine = ferry.load(folder, **options)
    assert len(engine.plan.prefix_layers) == (2 if stream == "prefixes" else 0)
    cold = ferry.load(folder, **options, reuse_prefix=False)
    one, two, want, second = two_turns(engine, cold)
    # Griffin's scores cover the last prompt: exactly its tokens are reused, the answer is prefilled.
    assert two.stats.reused_tokens == one.stats.prompt_tokens
    assert two.token_ids == want.token_ids
    dense = ferry.load(folder, dtype="fp32", ctx=96, progress=False, reuse_prefix=False)
    assert two.token_ids == dense.generate(second, max_new_tokens=N, chat=False, ignore_eos=True).token_ids


def test_cancelled_stream_leaves_a_reusable_prefix(tiny_model_dir):
    folder = tiny_model_dir("llama3")
    engine = ferry.load(folder, dtype="fp32", ctx=64, progress=False)
    cold = ferry.load(folder, dtype="fp32", ctx=64, progress=False, reuse_prefix=False)
    stream = engine.stream(FIRST, max_new_tokens=N, chat=False, ignore_eos=True)
    got = [next(stream).id for _ in range(4)]
    stream.close()
    assert stream.result is None and len(got) == 4
    second = FIRST + " one two three"
    two = engine.generate(second, max_new_tokens=N, chat=False, ignore_eos=True)
    assert two.stats.reused_tokens > 0
    assert two.token_ids == cold.generate(second, max_new_tokens=N, chat=False, ignore_eos=True).token_ids


def test_reset_and_unrelated_prompts_prefill_everything(tiny_model_dir):
    engine = ferry.load(tiny_model_dir("llama3"), dtype="fp32", ctx=64, progress=False)
    engine.generate(FIRST, max_new_tokens=4, chat=False)
    same = engine.generate(FIRST, max_new_tokens=4, chat=False)
    assert same.stats.reused_tokens == same.stats.prompt_tokens - 1  # one token left to compute logits
    engine.reset()
    assert engine.generate(FIRST, max_new_tokens=4, chat=False).stats.reused_tokens == 0
    other = engine.generate("def add(a, b): return a + b", max_new_tokens=4, chat=False)
    assert other.stats.reused_tokens < 2


@pytest.mark.slow
def test_conversation_on_the_default_model_reuses_the_previous_turn():
    engine = ferry.load(progress=False)
    messages = [{"role": "user", "content": "Name a color."}]
    one = engine.generate(messages, max_new_tokens=8)
    messages += [{"role": "assistant", "content": one.text}, {"role": "user", "content": "And another?"}]
    two = engine.generate(messages, max_new_tokens=8)
    # The template's system prompt and the first turn are not computed again.
    assert two.stats.reused_tokens >= one.stats.prompt_tokens
    assert two.stats.prompt_tokens - two.stats.reused_tokens < 24


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_device_prefixes_follow_each_reorder_copying_only_moved_records(quant, tiny_model_dir):
    """After every selection, a prefix-resident layer's device prefix equals its host buffer's
    first records. A new prefix is copied whole; after that a selection copies exactly the
    records that moved inside the prefix, few for a turn extending the last one."""
    folder = tiny_model_dir("qwen2")
    model = ferry.load(folder, dtype="fp32", ctx=96, progress=False).model
    plan = make_plan(model, dtype_bytes=4, budget_bytes=1 << 40, host_available_bytes=1 << 40, ctx=96, sparsity=0.5,
                     quant=QuantConfig(method=quant, group_size=32))
    fixed = plan.kv_cache_bytes + plan.workspace_bytes + plan.norm_bytes + (plan.lm_head_bytes or plan.embed_bytes)
    budget = fixed + 2 * plan.layer_bytes + 2 * plan.prefix_bytes + 64  # two slots, two selected sets
    options = dict(quant=quant, quant_group=32) if quant != "none" else {}
    engine = ferry.load(folder, dtype="fp32", ctx=96, progress=False, sparsity=0.5, gpu_memory=budget, **options)
    store = engine.runtime.executor.store
    assert len(store.prefix_layers) == 2, engine.plan
    copied, inside = [], []  # per selection: elements copied to the device; moved records inside prefixes
    reorder, copy = store.reorder_neurons, store.link.copy

    def counted_reorder(orders, rows):
        copied.append(0)
        inside.append(sum(int((moved_rows(orders[layer]) < rows).sum()) for layer in store.prefix_layers))

        def counted_copy(dst, src, **kw):
            copied[-1] += dst.numel()
            return copy(dst, src, **kw)
        store.link.copy = counted_copy
        try:
            reorder(orders, rows)
        finally:
            store.link.copy = copy
    store.reorder_neurons = counted_reorder

    def prefixes_match():
        size = store.fmt.prefix_numel(store.rows)
        return all(torch.equal(store.prefix_buffers[layer].cpu(), store.host[layer][:size])
                   for layer in store.prefix_layers)

    one = engine.generate(FIRST, max_new_tokens=N, chat=False, ignore_eos=True)
    assert prefixes_match()
    assert copied == [len(store.prefix_layers) * store.fmt.prefix_numel(store.rows)]  # new prefixes: whole
    engine.generate(FIRST + one.text + " three four", max_new_tokens=2, chat=False, ignore_eos=True)
    assert prefixes_match()
    engine.generate("def add(a, b): return a + b", max_new_tokens=2, chat=False, ignore_eos=True)
    assert prefixes_match()
    assert copied[1:] == [records * store.fmt.row_numel for records in inside[1:]]  # the moved records only
    assert 0 < inside[1] < inside[2]  # a follow-up moves fewer than a new prompt
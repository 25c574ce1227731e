"""ferry's model math against the transformers reference implementation, in fp32."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_hf_model
from helpers import load_tiny, prompt_ids
from ferry.kernels.reference import apply_rope
from ferry.model.forward import decode_one, forward, forward_chunk, prefill
from ferry.scheduler.decode import DecodeStats, Passes, decode_stepwise


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tiny_model_dir):
    cfg, weights, rope, cache = load_tiny(tiny_model_dir(family))
    ids = prompt_ids(20)  # longer than the Mistral window (8), so the window is exercised
    ours = forward(cfg, weights, rope, cache, ids, 0, all_logits=True)
    with torch.no_grad():
        ref = tiny_hf_model(family)(ids[None]).logits[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_match_transformers_generate(family, tiny_model_dir):
    cfg, weights, rope, cache = load_tiny(tiny_model_dir(family))
    ids = prompt_ids(7, seed=2)
    first = int(prefill(cfg, weights, rope, cache, ids)[-1].argmax())
    passes = Passes(cfg, rope, cache, weights, weights)
    ours = list(decode_stepwise(passes, first, 32, lambda l: int(l.argmax()), frozenset(),
                                DecodeStats(), sparse=False))
    hf = tiny_hf_model(family)
    with torch.no_grad():
        ref = hf.generate(ids[None], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    assert ours == ref


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_chunk_forward_equals_one_token_steps(family, tiny_model_dir):
    """The correction pass's K-token forward gives the logits of K single steps, and rewrites KV."""
    cfg, weights, rope, cache = load_tiny(tiny_model_dir(family))
    prompt, chunk = prompt_ids(6, seed=3), prompt_ids(5, seed=4)
    prefill(cfg, weights, rope, cache, prompt)
    stepwise = torch.cat([decode_one(cfg, weights, rope, cache, t.view(1)) for t in chunk])
    keys_stepwise = cache.k[:, :, :11].clone()
    # Roll back and fill the same positions with other tokens first, as a rejected draft would.
    cache.rollback(6)
    for t in prompt_ids(5, seed=9):
        decode_one(cfg, weights, rope, cache, t.view(1))
    chunked = forward_chunk(cfg, weights, rope, cache, chunk, start=6)
    torch.testing.assert_close(chunked, stepwise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k[:, :, :11], keys_stepwise, atol=1e-6, rtol=1e-6)
    assert cache.length == 11


def test_forward_rejects_gaps_and_overflow(tiny_model_dir):
    cfg, weights, rope, cache = load_tiny(tiny_model_dir("llama3"), capacity=8)
    prefill(cfg, weights, rope, cache, prompt_ids(4))
    with pytest.raises(ValueError, match="gap"):
        forward_chunk(cfg, weights, rope, cache, prompt_ids(2), start=5)
    with pytest.raises(ValueError, match="exceed"):
        forward_chunk(cfg, weights, rope, cache, prompt_ids(5), start=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_without_a_concatenated_copy_equals_the_concatenated_formula(dtype):
    x = torch.randn(5, 9, 16).to(dtype).transpose(0, 1)  # a strided view, as in attention
    cos, sin = torch.randn(5, 16).to(dtype), torch.randn(5, 16).to(dtype)
    rotated = torch.cat([-x[..., 8:], x[..., :8]], dim=-1)
    assert torch.equal(apply_rope(x, cos, sin), x * cos + rotated * sin)

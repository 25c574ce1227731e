"""ferry.kernels.attention against F.scaled_dot_product_attention (the reference), alone and
inside the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ferry.model.forward
from ferry.kernels import attention
from ferry.model.forward import attention_mask, decode_one, forward_chunk, prefill
from helpers import load_tiny, prompt_ids

KV_HEADS, GROUP, D = 3, 3, 64  # the default model's layout: 9 query heads over 3 KV heads


def inputs(s: int, keys: int, dtype, window: int | None = None, seed: int = 0):
    """q [kv, G*S, d] and k/v slices of a larger cache, as forward.attention passes them; the
    mask for S queries at the last S of `keys` positions (None for S = 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(KV_HEADS * GROUP, s, D, generator=g).to(dtype).reshape(KV_HEADS, GROUP * s, D)
    k_cache, v_cache = (torch.randn(KV_HEADS, keys + 5, D, generator=g).to(dtype) for _ in range(2))
    start = keys - s
    lo = max(0, keys - window - s + 1) if window else 0
    mask = attention_mask(start, s, lo, window, "cpu").repeat(GROUP, 1) if s > 1 else None
    return q, k_cache[:, lo:keys], v_cache[:, lo:keys], mask


def sdpa(q, k, v, mask):
    """SDPA over [1, heads, rows, d], the 4-D layout ferry calls it with (CUDA's fused kernels take
    only that)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=D ** -0.5)[0]


CASES = [(1, n) for n in (1, 2, 7, 64, 80, 257, 700)] + [(16, n) for n in (16, 17, 80, 300, 700)]


@pytest.mark.parametrize("s,keys", CASES)
def test_manual_equals_sdpa_fp32(s, keys):
    q, k, v, mask = inputs(s, keys, torch.float32)
    ours = attention.attend_manual(q, k, v, D ** -0.5, mask)
    torch.testing.assert_close(ours, sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s,keys", CASES)
def test_manual_bf16_is_as_close_to_exact_as_sdpa(s, keys):
    """Both round one fp32 result to bf16: they agree within a bf16 step, and ours is no farther
    from the attention computed in fp32 from the same bf16 inputs than SDPA is."""
    q, k, v, mask = inputs(s, keys, torch.bfloat16)
    ours, ref = attention.attend_manual(q, k, v, D ** -0.5, mask), sdpa(q, k, v, mask)
    assert ours.dtype == ref.dtype == torch.bfloat16 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=4e-3, rtol=1.6e-2)
    exact = sdpa(q.float(), k.float(), v.float(), mask)
    assert (ours.float() - exact).abs().max() <= (ref.float() - exact).abs().max() * 1.01 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliding_window_mask(dtype):
    q, k, v, mask = inputs(16, 40, dtype, window=8)
    ours, ref = attention.attend_manual(q, k, v, D ** -0.5, mask), sdpa(q, k, v, mask)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=1.6e-2)
    torch.testing.assert_close(ours, ref, **tol)


def test_backend_choice(monkeypatch):
    q, k, v, mask = inputs(16, 50, torch.float32)
    assert attention.BACKEND == "sdpa"  # the default: SDPA called 4-D, as `sdpa` above
    assert torch.equal(attention.attend(q, k, v, D ** -0.5, mask), sdpa(q, k, v, mask))
    monkeypatch.setattr(attention, "BACKEND", "manual")
    assert torch.equal(attention.attend(q, k, v, D ** -0.5, mask), attention.attend_manual(q, k, v, D ** -0.5, mask))


def run_model(folder, backend: str, monkeypatch) -> torch.Tensor:
    """Prefill, 6 decode steps and a 5-token correction pass; every logit row, concatenated."""
    monkeypatch.setattr(attention, "BACKEND", backend)
    cfg, weights, rope, cache = load_tiny(folder)
    out = [prefill(cfg, weights, rope, cache, prompt_ids(20))]
    for t in prompt_ids(6, seed=5):
        out.append(decode_one(cfg, weights, rope, cache, t.view(1)))
    out.append(forward_chunk(cfg, weights, rope, cache, prompt_ids(5, seed=6), start=22))
    return torch.cat(out)


@pytest.mark.parametrize("family", ["llama3", "mistral"])  # mistral: window 8 < the prompt
def test_model_logits_same_on_both_paths(family, tiny_model_dir, monkeypatch):
    if not hasattr(ferry.model.forward, "attend"):
        pytest.skip("ferry/model/forward.py does not call ferry.kernels.attention.attend yet")
    folder = tiny_model_dir(family)
    ref = run_model(folder, "sdpa", monkeypatch)
    ours = run_model(folder, "manual", monkeypatch)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_model_takes_attention_output_in_any_layout(tiny_model_dir, monkeypatch):
    """CUDA's memory-efficient SDPA returns [1, heads, rows, d] as a transposed view of
    [1, rows, heads, d]: every pass (prefill, decode, chunk) reads it by shape, not by layout."""
    folder = tiny_model_dir("llama3")
    ref = run_model(folder, "sdpa", monkeypatch)
    real = F.scaled_dot_product_attention

    def transposed(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(F, "scaled_dot_product_attention", transposed)
    assert not transposed(*(torch.zeros(1, 3, 2, 4),) * 3).is_contiguous()
    assert torch.equal(run_model(folder, "sdpa", monkeypatch), ref)

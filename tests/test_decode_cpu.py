"""The CPU's fused one-token ops (`ferry.kernels.decode_cpu`) against the plain-torch reference,
alone and inside whole bf16 generations."""

from __future__ import annotations

import pytest
import torch

import ferry
from ferry.kernels import decode_cpu
from ferry.kernels.reference import apply_rope, gated, rms_norm
from ferry.model.config import ModelConfig, RopeConfig
from ferry.model.forward import decode_one, prefill, rotate_qk
from ferry.model.kv_cache import KVCache
from ferry.model.rope import rope_for

BF16 = torch.bfloat16


def rows(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart (same-signed values; what a differently summed mean can move)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("size", [64, 100, 576, 4096])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_is_the_reference(size, residual):
    for seed in range(4):
        x, weight = rows(1, size, seed=seed, scale=3.0), (rows(size, seed=seed + 50) * 0.2 + 1).to(BF16)
        y = rows(1, size, seed=seed + 100) if residual else None
        stream = x.clone()
        got = decode_cpu.rms_norm(stream, weight, 1e-5, residual=y)
        summed = x + y if residual else x
        assert torch.equal(stream, summed)  # the residual add, rounded as torch rounds it
        want = rms_norm(summed, weight, 1e-5)
        # Only the mean of squares is summed in another order: at most one bf16 step, and rarely.
        assert ulps_apart(got, want).max() <= 1
        assert (got != want).float().mean() < 0.01


def test_rms_norm_of_extreme_rows():
    """Tiny, huge and constant rows, where eps and the range matter."""
    weight = torch.ones(64, dtype=BF16)
    for x in (torch.full((1, 64), 1e-20), torch.full((1, 64), 3e30), torch.linspace(-1e4, 1e4, 64)[None],
              torch.zeros(1, 64)):
        x = x.to(BF16)
        assert ulps_apart(decode_cpu.rms_norm(x.clone(), weight, 1e-6), rms_norm(x, weight, 1e-6)).max() <= 1


def config(heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=heads * head_dim, intermediate_size=64,
                       num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
                       rope=RopeConfig(theta=10000.0), max_position_embeddings=8192, tie_word_embeddings=False,
                       attention_bias=False)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_rope_write_is_the_reference(heads, kv_heads, head_dim):
    cfg = config(heads, kv_heads, head_dim)
    rope = rope_for(cfg, 300, BF16, "cpu")
    for seed, pos in enumerate((0, 1, 37, 299)):
        qkv = rows(1, cfg.q_size + 2 * cfg.kv_size, seed=seed, scale=2.0)
        k_cache, v_cache = rows(kv_heads, 300, head_dim, seed=90), rows(kv_heads, 300, head_dim, seed=91)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        caches = (k_cache[None], v_cache[None]) if seed % 2 else (k_cache, v_cache)  # KVCache.layer's 4-D views too
        q = decode_cpu.rope_write(cfg, qkv, rope.cos[pos:pos + 1], rope.sin[pos:pos + 1], *caches, pos)
        want_q, want_k = rotate_qk(cfg, qkv, rope.cos[pos:pos + 1], rope.sin[pos:pos + 1])
        assert torch.equal(q, want_q)  # bit for bit: every rounding is the reference's
        assert torch.equal(k_cache[:, pos], want_k[:, 0])
        assert torch.equal(v_cache[:, pos], qkv[0, cfg.q_size + cfg.kv_size:].view(kv_heads, head_dim))
        others = torch.arange(300) != pos
        assert torch.equal(k_cache[:, others], k_before[:, others])
        assert torch.equal(v_cache[:, others], v_before[:, others])


def test_rope_write_matches_apply_rope_with_real_tables():
    """The tables of a long context (large angles) through the kernel and through apply_rope."""
    cfg = config(4, 2, 64)
    rope = rope_for(cfg, 8192, BF16, "cpu")
    qkv = rows(1, cfg.q_size + 2 * cfg.kv_size, seed=3)
    k_cache, v_cache = (torch.zeros(2, 8192, 64, dtype=BF16) for _ in range(2))
    q = decode_cpu.rope_write(cfg, qkv, rope.cos[8000:8001], rope.sin[8000:8001], k_cache, v_cache, 8000)
    heads = qkv[:, :cfg.q_size].view(1, 4, 64).transpose(0, 1)
    assert torch.equal(q, apply_rope(heads, rope.cos[8000:8001], rope.sin[8000:8001]))


def test_where_the_kernels_apply(monkeypatch):
    one, two = torch.zeros(1, 8, dtype=BF16), torch.zeros(2, 8, dtype=BF16)
    assert decode_cpu.usable(one, torch.zeros(8, dtype=BF16))
    assert not decode_cpu.usable(two)  # several rows: prefill, chunks and batches keep torch's ops
    assert not decode_cpu.usable(one.float())  # fp32 runs the reference (tests compare in it)
    assert not decode_cpu.usable(one, torch.zeros(8))  # an fp32 norm weight would promote
    monkeypatch.setattr(decode_cpu, "ENABLED", False)
    assert not decode_cpu.usable(one)
    with pytest.raises(ValueError, match="contiguous"):
        decode_cpu.rms_norm(torch.zeros(8, 2, dtype=BF16).t()[:1], torch.zeros(8, dtype=BF16), 1e-5)


def counting(monkeypatch) -> dict:
    """Calls of each kernel from here on."""
    calls = {"_add_rms_norm": 0, "_rope_write": 0, "_gated_scatter": 0}
    for name in calls:
        kernel = getattr(decode_cpu, name)

        def run(*args, name=name, kernel=kernel):
            calls[name] += 1
            return kernel(*args)
        monkeypatch.setattr(decode_cpu, name, run)
    return calls


def decode_logits(engine, enabled: bool, monkeypatch) -> torch.Tensor:
    """Prefill, then 20 decode steps of given tokens (past mistral's window of 8): their logits."""
    monkeypatch.setattr(decode_cpu, "ENABLED", None if enabled else False)
    rt = engine.runtime
    cfg, rope = rt.model, rope_for(rt.model, 64, BF16, "cpu")
    cache = KVCache(cfg, 64, BF16, torch.device("cpu"))
    prefill(cfg, rt.weights, rope, cache, torch.tensor(engine.encode("The capital of France")))
    return torch.cat([decode_one(cfg, rt.weights, rope, cache, torch.tensor([7 + i])) for i in range(20)])


@pytest.mark.parametrize("family,quant", [("llama3", "none"), ("mistral", "none"), ("qwen2", "none"),
                                          ("llama3-blocks", "int4")])  # a window of 8; qkv biases; packed
def test_decode_steps_with_the_kernels_are_the_reference(family, quant, tiny_model_dir, monkeypatch):
    engine = ferry.load(tiny_model_dir(family), dtype="bf16", device="cpu", ctx=64, progress=False, quant=quant)
    packed = bool(engine.runtime.executor.store.packed)
    assert packed == (quant == "int4")
    calls = counting(monkeypatch)
    want = decode_logits(engine, False, monkeypatch)
    assert set(calls.values()) == {0}  # the reference ran torch's ops
    got = decode_logits(engine, True, monkeypatch)
    steps = 20 * engine.model.num_layers  # every step, every layer:
    assert calls == {"_add_rms_norm": 2 * steps, "_rope_write": steps, "_gated_scatter": steps if packed else 0}
    # bf16 through several layers: a value a bf16 step apart (the mean's order, SiLU's exp) moves
    # a logit a little
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("options", [{}, dict(sparsity=0.5, mode="sparse"), dict(quant="int4", sparsity=0.5, mode="sparse", sparse_method="cats")])
def test_generations_with_the_kernels_equal_the_reference(options, tiny_model_dir, monkeypatch):
    family = "llama3-blocks" if "quant" in options else "llama3"  # blocks: shapes the packed kernel takes
    engine = ferry.load(tiny_model_dir(family), dtype="bf16", device="cpu", ctx=64, progress=False, **options)
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(decode_cpu, "ENABLED", None if enabled else False)
        runs[enabled] = engine.generate("The capital of France", max_new_tokens=12, ignore_eos=True).token_ids
    assert runs[True] == runs[False]


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3, 1.002])  # 1.002: not a bf16 value
def test_gated_scatter_is_the_reference(threshold):
    width = 256
    for seed, rows in enumerate((1, 64, 200, 256)):
        gate, up = rows_(rows, seed, 2.0), rows_(rows, seed + 10, 1.0)
        # SiLU(1.28125) rounds to bf16 1.0: at threshold 1.002 (1.0 in bf16, as torch compares)
        # it stays, and would be dropped by a threshold left unrounded
        gate[0, 0] = 1.28125
        index = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:rows]
        got = decode_cpu.gated_scatter(gate, up, rows, index, threshold, width)
        _, z = gated(gate, up, threshold)
        want = torch.zeros(1, width, dtype=BF16).index_copy_(1, index, z)
        # SiLU's exp comes from another library than torch's: at most a bf16 step, and rarely
        assert ulps_apart(got, want).max() <= 1
        assert (got != want).float().mean() < 0.02
        assert torch.equal(got == 0, want == 0)  # the same neurons dropped by the threshold
        if threshold is not None and threshold <= 1.002:
            assert got[0, index[0]] != 0  # the neuron at the boundary stays


def test_gated_scatter_with_a_nan_threshold_drops_all():
    """torch's comparison with NaN is false: the reference drops every neuron; so does the kernel."""
    gate, up, index = rows_(64, 1, 2.0), rows_(64, 2, 1.0), torch.arange(64)
    got = decode_cpu.gated_scatter(gate, up, 64, index, float("nan"), 64)
    _, z = gated(gate, up, float("nan"))
    assert torch.equal(got, z) and not got.any()


def test_the_kernels_refuse_what_they_cannot_read():
    """They take addresses, so every size, dtype and position is checked before a call."""
    cfg = config(4, 2, 32)
    qkv, row = rows(1, cfg.q_size + 2 * cfg.kv_size, seed=0), torch.zeros(1, 32, dtype=BF16)
    caches = [torch.zeros(2, 16, 32, dtype=BF16) for _ in range(2)]
    with pytest.raises(ValueError, match="outside a cache"):
        decode_cpu.rope_write(cfg, qkv, row, row, *caches, 16)
    with pytest.raises(ValueError, match="values"):  # two layers' caches where one is written
        decode_cpu.rope_write(cfg, qkv, row, row, *(torch.zeros(2, 2, 16, 32, dtype=BF16) for _ in range(2)), 3)
    with pytest.raises(ValueError, match="values"):
        decode_cpu.rope_write(cfg, qkv[:, :-1], row, row, *caches, 3)  # a short qkv row
    with pytest.raises(ValueError, match="float32"):
        decode_cpu.rope_write(cfg, qkv, row.float(), row, *caches, 3)
    with pytest.raises(ValueError, match="values"):
        decode_cpu.rms_norm(torch.zeros(1, 64, dtype=BF16), torch.zeros(64, dtype=BF16), 1e-5,
                            residual=torch.zeros(1, 32, dtype=BF16))
    gate = rows_(64, 1, 1.0)
    with pytest.raises(ValueError, match="neurons"):
        decode_cpu.gated_scatter(gate, gate, 65, torch.arange(64), None, 64)
    with pytest.raises(ValueError, match="outside the row"):
        decode_cpu.gated_scatter(gate, gate, 64, torch.arange(64) + 1, None, 64)
    with pytest.raises(ValueError, match="int64"):
        decode_cpu.gated_scatter(gate, gate, 64, torch.arange(64).int(), None, 64)


def rows_(n: int, seed: int, scale: float) -> torch.Tensor:
    return rows(1, n, seed=seed, scale=scale)

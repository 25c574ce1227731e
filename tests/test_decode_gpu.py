"""The GPU's fused small ops (`ferry.kernels.decode_gpu`, Triton) against the plain-torch reference:
alone, in decode steps, and in the static step a CUDA graph captures. Without CUDA they run in
Triton's interpreter (conftest sets TRITON_INTERPRET), in fp32 and fp16 (its bf16 does not round
as the GPU does); with CUDA, in bf16 too."""

from __future__ import annotations

import pytest
import torch

import ferry
from ferry.kernels import decode_cpu, decode_gpu
from ferry.kernels.reference import rms_norm
from ferry.model import forward as fw
from ferry.model.config import ModelConfig, RopeConfig
from ferry.model.kv_cache import KVCache
from ferry.model.rope import rope_for
from ferry.model.static_step import decode_static

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setattr(decode_gpu, "ENABLED", True)


def rand(*shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def steps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in steps of the dtype's last bit (same-signed values)."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return int((a.view(bits).long() - b.view(bits).long()).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [64, 100, 576])
def test_rms_norm_is_the_reference(dtype, size):
    for seed, rows in enumerate((1, 3)):
        x, y = rand(rows, size, dtype=dtype, seed=seed, scale=3.0), rand(rows, size, dtype=dtype, seed=seed + 9)
        weight = (rand(size, dtype=dtype, seed=seed + 20) * 0.2 + 1).to(dtype)
        # only the sum of squares (a tree) and the root's last bit differ from the reference: in
        # fp32 a few steps of the last bit, in 16 bits at most one
        near = 4 if dtype == torch.float32 else 1
        assert steps_apart(decode_gpu.rms_norm(x.clone(), weight, 1e-5), rms_norm(x, weight, 1e-5)) <= near
        stream = x.clone()
        got = decode_gpu.rms_norm(stream, weight, 1e-5, residual=y)
        assert torch.equal(stream, x + y)  # the residual stream, updated in place as torch rounds the sum
        assert steps_apart(got, rms_norm(x + y, weight, 1e-5)) <= near


def config(heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=heads * head_dim, intermediate_size=64,
                       num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
                       rope=RopeConfig(theta=10000.0), max_position_embeddings=4096, tie_word_embeddings=False,
                       attention_bias=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 80), (8, 2, 128)])  # 80: a masked half
@pytest.mark.parametrize("s", [1, 3])
def test_rope_write_is_the_reference(dtype, heads, kv_heads, head_dim, s):
    cfg = config(heads, kv_heads, head_dim)
    rope = rope_for(cfg, 200, dtype, DEVICE)
    qkv = rand(s, cfg.q_size + 2 * cfg.kv_size, dtype=dtype, seed=s, scale=2.0)
    for pos, on_device in ((0, False), (150, False), (37, True)):
        caches = [rand(kv_heads, 200, head_dim, dtype=dtype, seed=90 + i) for i in range(2)]
        before = [c.clone() for c in caches]
        if on_device:  # a captured step: the whole tables, the position in a device tensor
            q = decode_gpu.rope_write(cfg, qkv, rope.cos, rope.sin, *caches, torch.tensor([pos], device=DEVICE))
        else:  # KVCache.layer's 4-D views at 150
            layer = [c[None] for c in caches] if pos else caches
            q = decode_gpu.rope_write(cfg, qkv, rope.cos[pos:pos + s], rope.sin[pos:pos + s], *layer, pos)
        want_q, want_k = fw.rotate_qk(cfg, qkv, rope.cos[pos:pos + s], rope.sin[pos:pos + s])
        assert torch.equal(q, want_q)  # bit for bit: every rounding is the reference's
        assert torch.equal(caches[0][:, pos:pos + s], want_k)
        values = qkv[:, cfg.q_size + cfg.kv_size:].view(s, kv_heads, head_dim).transpose(0, 1)
        assert torch.equal(caches[1][:, pos:pos + s], values)
        others = (torch.arange(200, device=DEVICE) < pos) | (torch.arange(200, device=DEVICE) >= pos + s)
        for cache, old in zip(caches, before):
            assert torch.equal(cache[:, others], old[:, others])


def test_where_the_kernels_apply(monkeypatch):
    x = torch.zeros(2, 8, device=DEVICE)
    assert decode_gpu.usable(x, torch.zeros(8, device=DEVICE))
    assert not decode_gpu.usable(x, torch.zeros(8, dtype=torch.float16, device=DEVICE))  # mixed dtypes
    assert not decode_gpu.usable(x.long())
    monkeypatch.setattr(decode_gpu, "ENABLED", None)
    assert decode_gpu.usable(x) == CUDA  # by default: CUDA only
    monkeypatch.setattr(decode_gpu, "ENABLED", False)
    assert not decode_gpu.usable(x)
    assert fw.fused_ops(x) is None
    monkeypatch.setattr(decode_gpu, "ENABLED", True)
    with pytest.raises(ValueError, match="contiguous"):
        decode_gpu.rms_norm(torch.zeros(8, 2, device=DEVICE).t(), torch.zeros(8, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="a weight of 4"):
        decode_gpu.rms_norm(torch.zeros(1, 8, device=DEVICE), torch.zeros(4, device=DEVICE), 1e-5)


def test_rope_write_refuses_what_it_cannot_write():
    """The kernel writes where it is told, unchecked: the launcher checks positions and shapes."""
    cfg = config(4, 2, 32)
    qkv, rows = torch.zeros(2, cfg.q_size + 2 * cfg.kv_size, device=DEVICE), torch.zeros(2, 32, device=DEVICE)
    caches = [torch.zeros(2, 16, 32, device=DEVICE) for _ in range(2)]
    with pytest.raises(ValueError, match="outside a cache"):
        decode_gpu.rope_write(cfg, qkv, rows, rows, *caches, 15)  # two tokens from 15: past 16
    with pytest.raises(ValueError, match="do not fit"):
        decode_gpu.rope_write(cfg, qkv[:, :-32], rows, rows, *caches, 0)
    with pytest.raises(ValueError, match="do not fit"):
        decode_gpu.rope_write(cfg, qkv, rows, rows, caches[0], caches[1][:1], 0)
    with pytest.raises(ValueError, match="do not fit"):  # two layers' caches where one is written
        decode_gpu.rope_write(cfg, qkv, rows, rows, *(torch.zeros(2, 2, 16, 32, device=DEVICE) for _ in range(2)), 0)


def counting(monkeypatch) -> dict:
    """Launches of each kernel from here on."""
    calls = {"rms_norm": 0, "rope_write": 0}
    for name in calls:
        launcher = getattr(decode_gpu, name)

        def run(*args, name=name, launcher=launcher, **kw):
            calls[name] += 1
            return launcher(*args, **kw)
        monkeypatch.setattr(decode_gpu, name, run)
    return calls


def passes(engine, enabled: bool, monkeypatch, dtype) -> torch.Tensor:
    """A prefill, 10 decode steps and a 3-token chunk (past mistral's window of 8): every logit."""
    monkeypatch.setattr(decode_gpu, "ENABLED", enabled)
    rt = engine.runtime
    cfg, rope = rt.model, rope_for(rt.model, 64, dtype, DEVICE)
    cache = KVCache(cfg, 64, dtype, torch.device(DEVICE))
    out = [fw.prefill(cfg, rt.weights, rope, cache, torch.tensor(engine.encode("The capital of France")))]
    out += [fw.decode_one(cfg, rt.weights, rope, cache, torch.tensor([7 + i])) for i in range(10)]
    out.append(fw.forward_chunk(cfg, rt.weights, rope, cache, torch.tensor([3, 4, 5]), cache.length))
    return torch.cat(out)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])  # a window of 8; qkv biases
def test_passes_with_the_kernels_are_the_reference(family, tiny_model_dir, monkeypatch):
    dtype = torch.float32
    engine = ferry.load(tiny_model_dir(family), dtype="fp32", device=DEVICE, ctx=64, progress=False)
    want = passes(engine, False, monkeypatch, dtype)
    calls = counting(monkeypatch)
    got = passes(engine, True, monkeypatch, dtype)
    layers = engine.model.num_layers
    assert calls == {"rms_norm": 2 * 12 * layers, "rope_write": 12 * layers}  # every pass, every layer
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32: the norms' sums differ in order


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_the_static_step_with_the_kernels_is_the_decode_step(family, tiny_model_dir, monkeypatch):
    """What a CUDA graph captures: the position read on the device, the whole rope tables."""
    engine = ferry.load(tiny_model_dir(family), dtype="fp32", device=DEVICE, ctx=64, progress=False)
    rt = engine.runtime
    cfg, rope = rt.model, rope_for(rt.model, 64, torch.float32, DEVICE)
    caches = [KVCache(cfg, 64, torch.float32, torch.device(DEVICE)) for _ in range(2)]
    for cache in caches:
        fw.prefill(cfg, rt.weights, rope, cache, torch.tensor(engine.encode("def add(a, b):")))
    token, pos = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
    calls = counting(monkeypatch)
    for step in range(10):
        start = caches[0].length
        token.fill_(5 + step)
        pos.fill_(start)
        monkeypatch.setattr(decode_gpu, "ENABLED", False)
        want = fw.decode_one(cfg, rt.weights, rope, caches[0], token)
        monkeypatch.setattr(decode_gpu, "ENABLED", True)
        got = decode_static(cfg, rt.weights, rope, caches[1], token, pos, span=32)
        caches[1].length = start + 1
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(caches[1].k[:, :, :start + 1], caches[0].k[:, :, :start + 1])
    assert calls["rope_write"] == 10 * cfg.num_layers


def test_cpu_kernels_come_first_for_one_bf16_token(monkeypatch):
    """Both apply to one bf16 token on the CPU here (the GPU's through the interpreter): the
    CPU's own are the ones used there."""
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert decode_cpu.usable(x) and decode_gpu.usable(x)
    assert fw.fused_ops(x) is decode_cpu

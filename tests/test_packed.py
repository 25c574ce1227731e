"""Resident quantized layers through the packed int4 kernel, against the dequantize-then-matmul path
(the reference): one layer, then whole engines in every mode, in fp32."""

from __future__ import annotations

import pytest
import torch

import ferry
from ferry.kernels.gather import moved_rows
from ferry.kernels.int4pack import layout_matches
from ferry.kernels.reference import bundled_mlp
from ferry.model import packed
from ferry.model.dequant import dequantize_layer
from ferry.model.forward import linear
from ferry.model.packed import can_pack, pack_layer, packed_mlp
from ferry.model.quant import QuantConfig, QuantLayout, quantize_layer
from test_quant import budget, model_config, random_layer

pytestmark = pytest.mark.skipif(not layout_matches(), reason="this torch packs int4 differently")
PROMPTS = ["The capital of France", "def add(a, b):", "A quick brown fox"]


@pytest.fixture
def quant_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))


def quantized_layer(method: str, bias: bool = True):
    cfg = model_config(128, 2, 1, 256, attention_bias=bias)
    q = QuantLayout.for_config(cfg, QuantConfig(method))
    raw = torch.empty(q.numel, dtype=torch.uint8)
    quantize_layer(q, random_layer(cfg, 4), raw)
    return cfg, q, raw


def reorder(n: int, moves: str) -> torch.Tensor:
    """A permutation of n neurons: any ("all"), or a few traded pairs ("few": an in-place move)."""
    g = torch.Generator().manual_seed(5)
    if moves == "all":
        return torch.randperm(n, generator=g)
    order, pairs = torch.arange(n), torch.randperm(n, generator=g)[:n // 10 * 2].view(2, -1)
    order[pairs[0]], order[pairs[1]] = pairs[1], pairs[0]
    return order


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("rows", [256, 100, 64])
@pytest.mark.parametrize("moves", ["all", "few"])
def test_packed_layer_equals_dequantized_layer(method, rows, moves):
    cfg, q, raw = quantized_layer(method)
    assert can_pack(q, torch.device("cpu"))
    order = reorder(cfg.intermediate_size, moves)
    packed = pack_layer(q, raw, torch.float32)
    layer = packed.reordered(order, moved_rows(order))
    assert (layer.gate is packed.gate) == (moves == "few")  # a few rows move in place
    records = raw[q.mlp_offset:].view(cfg.intermediate_size, q.row_numel)
    records.copy_(records[order])  # the same reorder on the bytes the reference dequantizes
    flat = torch.zeros(q.base.numel)
    dequantize_layer(q, raw, flat, rows, "torch")
    want, got = q.base.views(flat, rows=rows), layer.weights(rows)
    x = torch.randn(3, cfg.hidden_size)
    torch.testing.assert_close(linear(x, got.qkv, got.qkv_bias), linear(x, want.qkv, want.qkv_bias))
    torch.testing.assert_close(linear(x[:, :cfg.q_size], got.o), linear(x[:, :cfg.q_size], want.o))
    torch.testing.assert_close(got.attn_norm, want.attn_norm, rtol=0, atol=0)
    seen = {}
    out = packed_mlp(x, got.mlp[0], observe=lambda a, z: seen.update(got=(a, z)))
    ref = bundled_mlp(x, want.mlp[0], observe=lambda a, z: seen.update(want=(a, z)))
    torch.testing.assert_close(out, ref)
    for mine, theirs in zip(seen["got"], seen["want"]):  # selection sees the same neurons in order
        torch.testing.assert_close(mine, theirs)


def test_cats_threshold_skips_the_same_neurons():
    cfg, q, raw = quantized_layer("int4", bias=False)
    flat = torch.zeros(q.base.numel)
    dequantize_layer(q, raw, flat, cfg.intermediate_size, "torch")
    x = torch.randn(2, cfg.hidden_size)
    got = packed_mlp(x, pack_layer(q, raw, torch.float32).weights(cfg.intermediate_size).mlp[0], threshold=0.02)
    torch.testing.assert_close(got, bundled_mlp(x, q.base.views(flat).mlp[0], threshold=0.02))


def test_shapes_without_whole_blocks_are_not_packed():
    cfg = model_config(128, 2, 1, 160)  # 160 neurons: not whole blocks of 64, reorders need them
    assert not can_pack(QuantLayout.for_config(cfg, QuantConfig("int4")), torch.device("cpu"))


def load(folder, kernel: bool, **options):
    packed.ENABLED = kernel  # True: the kernel in fp32 too (exact, slow), to compare with the reference
    try:
        return ferry.load(folder, **{"dtype": "fp32", "ctx": 64, "progress": False, **options})
    finally:
        packed.ENABLED = None


def packed_layers(engine) -> int:
    return len(engine.runtime.weights.layers.executor.store.packed)


@pytest.mark.parametrize("family, method", [("llama3-blocks", "int4"), ("qwen2-blocks", "int8"),
                                            ("qwen2-blocks", "int4")])
def test_engine_on_packed_layers_equals_dequantized_engine(family, method, tiny_model_dir, quant_cache):
    folder = tiny_model_dir(family)
    fast, ref = load(folder, True, quant=method), load(folder, False, quant=method)
    assert packed_layers(fast) == 4 and packed_layers(ref) == 0
    for prompt in PROMPTS:
        ids = fast.encode(prompt)
        torch.testing.assert_close(fast.logits(ids), ref.logits(ids), rtol=1e-5, atol=1e-5)
        want = ref.generate(prompt, max_new_tokens=12, ignore_eos=True)
        assert fast.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids == want.token_ids


@pytest.mark.parametrize("options", [dict(sparse_method="griffin", sparsity=0.5, period=4),
                                     dict(sparse_method="griffin", sparsity=0.6, period=16),
                                     dict(sparse_method="cats", sparsity=0.5, period=4)])
def test_strict_sirius_on_packed_layers_equals_dense(options, tiny_model_dir, quant_cache):
    folder = tiny_model_dir("llama3-blocks")
    dense = load(folder, True, quant="int4")
    sparse = load(folder, True, quant="int4", accept="strict", **options)
    assert packed_layers(sparse) == 4
    for prompt in PROMPTS:
        got = sparse.generate(prompt, max_new_tokens=16, ignore_eos=True)
        assert got.token_ids == dense.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids
        assert got.stats.mode == "sirius" and got.stats.sparse_steps > 0


@pytest.mark.parametrize("sparse_method", ["griffin", "cats"])
def test_sparse_steps_on_packed_layers_equal_the_dequantized_ones(sparse_method, tiny_model_dir, quant_cache):
    folder = tiny_model_dir("qwen2-blocks")
    options = dict(quant="int4", sparsity=0.6, mode="sparse", sparse_method=sparse_method)
    fast, ref = load(folder, True, **options), load(folder, False, **options)
    assert packed_layers(fast) == 4
    for prompt in PROMPTS:
        want = ref.generate(prompt, max_new_tokens=12, ignore_eos=True)
        got = fast.generate(prompt, max_new_tokens=12, ignore_eos=True)
        assert got.token_ids == want.token_ids and got.stats.sparse_steps == want.stats.sparse_steps > 0


# --- lm_head as int8 groups ------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [True, False])
def test_int8_head_equals_its_groups_dequantized(kernel, monkeypatch):
    from ferry.kernels.quant_fit import fit_groups
    from ferry.model.packed import GroupedMatrix, PackedMatrix, int8_head

    monkeypatch.setattr(packed, "ENABLED", kernel)
    monkeypatch.setattr(packed, "TILE_ROWS", 128)  # several tiles for the tiled form
    w = torch.randn(400, 96, generator=torch.Generator().manual_seed(7))
    grouped = fit_groups(w, 8, 32, fit=False)
    blocks = [(lo, grouped.rows(slice(lo, lo + 128))) for lo in range(0, 400, 128)]  # 400 = 6 blocks + 16 rows
    head = int8_head((400, 96), 32, iter(blocks), torch.device("cpu"), torch.float32)
    assert isinstance(head, PackedMatrix if kernel else GroupedMatrix)
    x = torch.randn(2, 96)
    torch.testing.assert_close(linear(x, head), x @ grouped.dequantize().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama3-blocks", "llama-tied"])
def test_engine_with_int8_head_equals_the_tiled_head(family, tiny_model_dir, quant_cache):
    """The packed head and the tiled one (devices without the kernel) compute the same logits, and
    both differ from the fp32 head only by int8 rounding."""
    folder = tiny_model_dir(family)
    fast, ref = load(folder, True, quant="int4"), load(folder, False, quant="int4")
    plain = load(folder, True, quant="int4", quant_lm_head="none")
    assert fast.plan.lm_head_quant == "int8" and plain.plan.lm_head_quant == "none"
    ids = fast.encode(PROMPTS[0])
    torch.testing.assert_close(fast.logits(ids), ref.logits(ids), rtol=1e-5, atol=1e-5)
    gap = (fast.logits(ids) - plain.logits(ids)).abs().max().item()
    assert 0 < gap < 0.05


def test_tiles_smaller_than_a_layer_give_the_same_model(tiny_model_dir, quant_cache, monkeypatch):
    """Streamed quantized layers are dequantized a tile at a time: tiles of 64 neurons (several
    per layer, attention matrices in several row tiles) equal one tile for the whole layer."""
    from ferry.model import dequant

    folder = tiny_model_dir("qwen2")
    options = dict(quant="int8", sparsity=0.5, mode="sparse")
    whole = load(folder, False, **options)
    monkeypatch.setattr(dequant, "TILE_VALUES", 1)  # the floor: 64 neurons' rows
    tiled = load(folder, True, **options, gpu_memory=budget(folder, QuantConfig("int8"), resident=0))
    assert len(tiled.plan.streamed_layers) == 4
    assert tiled.runtime.weights.layers.executor.store.work.numel() < 2 * 64 * 3 * 64
    for prompt in PROMPTS:
        want = whole.generate(prompt, max_new_tokens=8, ignore_eos=True)
        assert tiled.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids == want.token_ids


# --- the packed layers in every way generation uses them ----------------------------------------
def test_batch_on_packed_layers_equals_each_sequence_alone(tiny_model_dir, quant_cache):
    """Several sequences' rows through one packed product each, dense and strict Sirius."""
    from ferry.engine.batch import generate_batch
    from ferry.engine.generation import Request

    folder = tiny_model_dir("llama3-blocks")
    dense = load(folder, True, quant="int4", reuse_prefix=False)
    sirius = load(folder, True, quant="int4", reuse_prefix=False, sparsity=0.5, accept="strict", period=4)
    assert packed_layers(sirius) == 4
    reqs = [Request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, [9, 4, 7])]
    want = [dense.generate(r.prompt, max_new_tokens=r.max_new_tokens, ignore_eos=True).token_ids for r in reqs]
    for engine in (dense, sirius):
        got = dict(generate_batch(engine.runtime, reqs, 3))
        assert [got[i].token_ids for i in range(3)] == want


def test_second_turn_on_packed_layers_equals_cold(tiny_model_dir, quant_cache):
    """Prefix reuse keeps Griffin's sums across turns; the reorder permutes packed gate/up rows."""
    folder = tiny_model_dir("llama3-blocks")
    options = dict(quant="int4", ctx=96, sparsity=0.5, accept="strict", period=4)
    warm, cold = load(folder, True, **options), load(folder, True, **options, reuse_prefix=False)
    first = warm.generate("The capital of France", max_new_tokens=6, chat=False, ignore_eos=True)
    second = "The capital of France" + first.text + " and"
    two = warm.generate(second, max_new_tokens=8, chat=False, ignore_eos=True)
    assert two.stats.reused_tokens > 0
    assert two.token_ids == cold.generate(second, max_new_tokens=8, chat=False, ignore_eos=True).token_ids


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_follow_up_turns_move_packed_rows_in_place_as_the_reference_does(method, tiny_model_dir, quant_cache,
                                                                           monkeypatch):
    """Sparse steps (no correction to hide a wrong row) over turns that extend each other: a
    follow-up moves few neurons, which the packed layers move in place; every turn's tokens
    equal the dequantizing engine's, which gathers the record rows."""
    from ferry.kernels import int4pack

    folder = tiny_model_dir("llama3-blocks")
    options = dict(quant=method, ctx=96, sparsity=0.5, mode="sparse")
    fast, ref = load(folder, True, **options), load(folder, False, **options)
    assert packed_layers(fast) == 4 and packed_layers(ref) == 0
    in_place = []
    move = int4pack.move_rows_
    monkeypatch.setattr(int4pack, "move_rows_", lambda *args: in_place.append(1) or move(*args))
    text = "The capital of France"
    for words in (" is", " and then", " one two three"):
        got = fast.generate(text, max_new_tokens=6, chat=False, ignore_eos=True)
        want = ref.generate(text, max_new_tokens=6, chat=False, ignore_eos=True)
        assert got.token_ids == want.token_ids
        text += got.text + words
    assert in_place  # some follow-up took the in-place path


def test_packed_resident_and_tiled_streamed_layers_together(tiny_model_dir, quant_cache):
    """One layer resident (packed), three streamed through tiles: the dequantized engine's output."""
    folder = tiny_model_dir("qwen2-blocks")
    options = dict(quant="int8", sparsity=0.5, mode="sparse", resident_sparse=False)
    mixed = load(folder, True, **options, gpu_memory=budget(folder, QuantConfig("int8"), resident=1))
    assert packed_layers(mixed) == 1 and len(mixed.plan.streamed_layers) == 3
    ref = load(folder, False, **options)
    for prompt in PROMPTS:
        want = ref.generate(prompt, max_new_tokens=8, ignore_eos=True)
        assert mixed.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids == want.token_ids


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_planner_counts_a_packed_layer_as_it_is_held(method):
    """The plan's resident layer size equals the packed form's bytes, the sparse view's table
    copies included (int8 holds two tables per matrix: more than its record bytes)."""
    from ferry.offload.accounting import packed_layer_bytes

    cfg, q, raw = quantized_layer(method)
    layer = pack_layer(q, raw, torch.bfloat16)
    sparse = layer.weights(100).mlp[0]  # 100 neurons: gate/up tables for the first 128 rows copied
    tensors = [t for v in layer.attention.values() if v is not None
               for t in ([v] if isinstance(v, torch.Tensor) else [x for p in v.parts for x in (p.packed, p.table)])]
    tensors += [x for m in (layer.gate, layer.up, layer.down) for p in m.parts for x in (p.packed, p.table)]
    tensors += [layer.index] + [p.table for m in (sparse.gate, sparse.up) for p in m.parts]
    held = sum(t.numel() * t.element_size() for t in tensors)
    quant = QuantConfig(method)
    sparsity = 1 - 100 / cfg.intermediate_size
    assert packed_layer_bytes(cfg, quant, 2, sparsity) == held
    if method == "int8":
        assert held > q.numel  # the reason the planner counts the packed form

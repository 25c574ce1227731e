"""GGUF blocks read as ferry's grouped form, checked against the gguf package's own dequantizer."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, quants
from safetensors import safe_open

from ferry.errors import FerryError
from ferry.kernels.quant import dequantize_reference
from ferry.offload import gguf as gguf_mod, gguf_blocks
from helpers import write_gguf

BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34, T.Q4_K: 144}  # per block
VALUES = {T.Q4_0: 32, T.Q4_1: 32, T.Q8_0: 32, T.Q4_K: 256}


def random_blocks(qtype, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes in every field (so every bit of the layout matters), sane fp16 d (and m)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows, blocks, BYTES[qtype]), dtype=np.uint8)
    halves = 2 if qtype in (T.Q4_1, T.Q4_K) else 1
    for i in range(halves):
        scale = rng.uniform(1e-3, 2e-2, (rows, blocks)) * rng.choice([-1, 1], (rows, blocks))
        b[..., 2 * i:2 * i + 2] = scale.astype(np.float16).view(np.uint8).reshape(rows, blocks, 2)
    if qtype == T.Q8_0:
        b[..., 2:][b[..., 2:] == 0x80] = 0x81  # -128 is refused (tested below)
    return b.reshape(rows, -1)


def dequantized(data: np.ndarray, qtype) -> np.ndarray:
    return gguf_blocks.grouped(data, qtype).dequantize().numpy()


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_legacy_blocks_are_exact(qtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)
    for data in (quants.quantize(w, qtype), random_blocks(qtype, 16, 8)):
        g = gguf_blocks.grouped(data, qtype)
        assert g.group == 32 and g.bits == (8 if qtype == T.Q8_0 else 4) and g.shape == (16, 256)
        np.testing.assert_array_equal(g.dequantize().numpy(), quants.dequantize(data, qtype))


def test_q4_k_is_exact_up_to_fp16_sub_block_scales():
    data = random_blocks(T.Q4_K, 8, 3)
    ref = quants.dequantize(data, T.Q4_K).astype(np.float64)
    g = gguf_blocks.grouped(data, T.Q4_K)
    assert g.group == 32 and g.shape == (8, 768)
    # Exact d * sc and dmin * mn, as gguf forms them in fp32 (17 bits: exact).
    b = data.reshape(8, 3, 144)
    d, dmin = (b[..., i:i + 2].copy().view(np.float16)[..., 0].astype(np.float64) for i in (0, 2))
    sc, mn = gguf_blocks.q4_k_scales(b[..., 4:16])
    scale, minimum = (d[..., None] * sc).reshape(8, 24), -(dmin[..., None] * mn).reshape(8, 24)
    np.testing.assert_array_equal(g.scale.numpy(), scale.astype(np.float16))
    np.testing.assert_array_equal(g.minimum.numpy(), minimum.astype(np.float16))
    # The only error is the rounding of each to fp16: half an ulp each, the scale's times q <= 15.
    half_ulp = lambda x: np.spacing(np.abs(x).astype(np.float16)).astype(np.float64) / 2  # noqa: E731
    bound = np.repeat(15 * half_ulp(scale) + half_ulp(minimum), 32, axis=1) + 1e-7 * np.abs(ref)
    err = np.abs(g.dequantize().numpy() - ref)
    assert (err <= bound).all() and err.max() > 0


def test_unsupported_or_unrepresentable_blocks_are_left_to_the_caller():
    for qtype in (T.F32, T.F16, T.BF16, T.Q5_0, T.Q5_1, T.Q6_K, T.Q2_K, T.Q3_K, T.IQ4_NL, "Q5_K"):
        assert gguf_blocks.grouped(np.zeros((2, 210), np.uint8), qtype) is None
    q8 = random_blocks(T.Q8_0, 2, 1)
    q8[0, 5] = 0x80  # code -128: not a symmetric int8 group
    assert gguf_blocks.grouped(q8, T.Q8_0) is None
    q4 = random_blocks(T.Q4_0, 2, 1)
    q4[0, :2] = np.array([10000.0], np.float16).view(np.uint8)  # -8d overflows fp16
    assert gguf_blocks.grouped(q4, T.Q4_0) is None
    with pytest.raises(ValueError, match="uint8"):
        gguf_blocks.grouped(np.zeros((2, 19), np.uint8), T.Q4_0)


def test_dequantized_note_is_one_line():
    note = gguf_mod.dequantized_note(Counter({"Q6_K": 12, "Q5_0": 3}))
    assert note == "Q5_0 (3), Q6_K (12) tensors are dequantized to bf16; Q4_0, Q4_1, Q4_K and Q8_0 are kept as stored"


# --- conversion ----------------------------------------------------------------------------------
def _from_folder(f, name: str) -> torch.Tensor:
    """`name` from a converted shard (grouped ones dequantized to fp32)."""
    base, keys = name.removesuffix(".weight"), set(f.keys())
    if f"{base}.q4" in keys:
        return dequantize_reference(f.get_tensor(f"{base}.q4"), f.get_tensor(f"{base}.scales"),
                                    f.get_tensor(f"{base}.mins"), 4, torch.float32)
    if f"{base}.q8" in keys:
        return dequantize_reference(f.get_tensor(f"{base}.q8").view(torch.uint8), f.get_tensor(f"{base}.scales"),
                                    None, 8, torch.float32)
    return f.get_tensor(name)


def test_conversion_keeps_q4_and_q8_and_unpermutes_q_k(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = tiny_model_dir("llama3")
    qtypes = {f"blk.{i}.{m}.weight": T.Q4_1 for i in range(4) for m in ("attn_v", "attn_output", "ffn_up", "ffn_gate")}
    qtypes.update({"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q4_1,
                   "blk.1.attn_q.weight": T.Q8_0, "blk.0.ffn_down.weight": T.Q5_0})
    path = write_gguf(folder, tmp_path / "tiny-q.gguf", qtypes=qtypes)
    out = gguf_mod.convert_gguf(path, tmp_path / "cache")
    assert capsys.readouterr().err.count("Q5_0 (1) tensors are dequantized to bf16") == 1

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    [shard] = set(index.values())
    original = load_file(folder / "model.safetensors")
    reader = GGUFReader(path)
    with safe_open(str(out / shard), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert set(index) == set(dtypes)
        assert dtypes["model.embed_tokens.q8"] == "I8" and dtypes["model.embed_tokens.scales"] == "F16"
        q_proj = [dtypes[f"model.layers.0.self_attn.q_proj.{s}"] for s in ("q4", "scales", "mins")]
        assert q_proj == ["U8", "F16", "F16"]
        assert dtypes["model.layers.0.mlp.down_proj.weight"] == "BF16"  # Q5_0: dequantized
        assert dtypes["model.layers.0.input_layernorm.weight"] == "F32"
        assert f.get_slice("model.layers.0.self_attn.k_proj.q4").get_shape() == [32, 32]  # [out, in / 2]
        assert f.get_slice("model.layers.0.self_attn.k_proj.scales").get_shape() == [32, 2]  # [out, in / 32]
        assert dtypes["model.layers.1.self_attn.q_proj.q8"] == "I8"
        assert dtypes["model.layers.2.self_attn.q_proj.weight"] == "F32"  # F32 in the GGUF
        assert not any(k.endswith(("up_proj.weight", "embed_tokens.weight")) for k in dtypes)
        for t in reader.tensors:
            name = gguf_mod.hf_name(t.name)
            got = _from_folder(f, name)
            want = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy())
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = 4 if "q_proj" in name else 2
                want = torch.from_numpy(gguf_mod.unpermute_rope_rows(want.numpy(), heads).copy())
                # back in the checkpoint's own row order (quantization error aside)
                orig = original[name]
                torch.testing.assert_close(got.float(), orig, rtol=0, atol=float(orig.abs().max()) / 7)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0)


def default_gguf():
    from ferry.offload.sources import default_model_gguf

    try:
        return default_model_gguf()
    except FerryError as err:
        pytest.skip(str(err))


def test_default_model_layer_0_is_read_exactly():
    reader = GGUFReader(default_gguf())
    tensors = [t for t in reader.tensors if t.name.startswith("blk.0.") and len(t.data.shape) == 2]
    assert len(tensors) == 7
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    for t, data in [(t, t.data) for t in tensors] + [(embed, embed.data[:1024])]:
        assert t.tensor_type.name in gguf_blocks.KEPT
        np.testing.assert_array_equal(dequantized(data, t.tensor_type), quants.dequantize(data, t.tensor_type))

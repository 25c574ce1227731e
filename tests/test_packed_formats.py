"""Checkpoints whose linear weights are stored pre-quantized: ferry's q4/q8, AWQ gemm, GPTQ.

The packing below is written here from the documented layouts, not taken from ferry:
- AutoAWQ gemm (awq/modules/linear/gemm.py, `pack`): qweight [in, out/8] and qzeros
  [in/g, out/8] hold 8 output columns per int32, column 8c + ORDER[k] in bits 4k with
  ORDER = 0 2 4 6 1 3 5 7; scales [in/g, out]; w = (q - z) * s.
- AutoGPTQ / GPTQModel (`QuantLinear.pack`): qweight [in/8, out] holds input rows 8r..8r+7 in
  bits 4k; qzeros [in/g, out/8] columns in order; checkpoint_format "gptq" stores z - 1,
  "gptq_v2" stores z; g_idx [in] is each input row's group.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ferry.errors import FerryError
from ferry.model.forward import prefill
from ferry.offload.checkpoint import TensorReader, open_checkpoint, source_quant
from ferry.offload.pack import layer_shapes
from helpers import load_tiny, prompt_ids

GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def tiny_float_state():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return cfg, {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny():
    return tiny_float_state()


def linear_names(cfg) -> dict[str, tuple[int, int]]:
    from ferry.model.config import ModelConfig

    shapes = layer_shapes(ModelConfig.from_hf(cfg))
    return {f"model.layers.{i}.{k}": s for i in range(cfg.num_hidden_layers)
            for k, s in shapes.items() if len(s) == 2}


def write_folder(folder, cfg, tensors, quantization_config=None):
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    if quantization_config is not None:
        raw = json.loads((folder / "config.json").read_text())
        raw["quantization_config"] = quantization_config
        (folder / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def pack_words(v: np.ndarray, order) -> torch.Tensor:
    """v [..., 8n] in 0..15 -> int32 [..., n]: bits 4k of word c hold v[..., 8c + order[k]]."""
    v = v.astype(np.uint32).reshape(*v.shape[:-1], -1, 8)
    words = np.zeros(v.shape[:-1], np.uint32)
    for k, column in enumerate(order):
        words |= v[..., column] << np.uint32(4 * k)
    return torch.from_numpy(words.view(np.int32).copy())


def random_codes(shape, groups, seed, zeros=(0, 16)):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, shape, generator=g)
    z = torch.randint(zeros[0], zeros[1], (shape[0], groups), generator=g)
    s = (torch.rand(shape[0], groups, generator=g) * 0.02 + 1e-3).half()
    return q, z, s


def zero_point_reference(q, z, s, group):
    """(q - z) * s in fp64, groups of `group` along in."""
    return ((q - z.repeat_interleave(group, 1)).double() * s.double().repeat_interleave(group, 1))


def awq_parts(q, z, s):
    return {"qweight": pack_words(q.t().numpy(), AWQ_ORDER), "qzeros": pack_words(z.t().numpy(), AWQ_ORDER),
            "scales": s.t().contiguous()}


def gptq_qweight(q):
    """[out, in] -> int32 [in/8, out]: input rows 8r..8r+7 in word r of each column."""
    return pack_words(q.numpy(), range(8)).t().contiguous()


def quantized_folder(tmp_path, cfg, state, method, group=GROUP, v1=True, sym=False, name="ckpt"):
    """A folder whose decoder linear weights are random codes in `method`'s packing; returns it
    with each weight's (q, z, s) (z None for ferry's forms, whose s are scales and z mins)."""
    tensors = dict(state)
    codes = {}
    for i, (name_w, (out, cin)) in enumerate(linear_names(cfg).items()):
        base = name_w.removesuffix(".weight")
        g = cin if group == -1 else group
        lo_hi = (8, 9) if sym else ((1, 17) if method == "gptq" and v1 else (0, 16))
        q, z, s = random_codes((out, cin), cin // g, seed=i, zeros=lo_hi)
        del tensors[name_w]
        if method == "q4":
            mins = (torch.randn(out, cin // g, generator=torch.Generator().manual_seed(100 + i)) * 0.05).half()
            qu = q.to(torch.uint8)
            tensors.update({f"{base}.q4": qu[:, 0::2] | (qu[:, 1::2] << 4), f"{base}.scales": s,
                            f"{base}.mins": mins})
            codes[name_w] = (q, mins, s)
        elif method == "q8":
            q8 = torch.randint(-127, 128, (out, cin), generator=torch.Generator().manual_seed(i)).to(torch.int8)
            tensors.update({f"{base}.q8": q8, f"{base}.scales": s})
            codes[name_w] = (q8, None, s)
        elif method == "awq":
            tensors.update({f"{base}.{k}": v for k, v in awq_parts(q, z, s).items()})
            codes[name_w] = (q, z, s)
        else:
            stored = z - 1 if v1 else z
            tensors.update({f"{base}.qweight": gptq_qweight(q),
                            f"{base}.qzeros": pack_words(stored.t().numpy(), range(8)),
                            f"{base}.scales": s.t().contiguous(), f"{base}.g_idx": (torch.arange(cin) // g).int()})
            codes[name_w] = (q, z, s)
    qc = {"q4": None, "q8": None,
          "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True},
          "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": sym,
                   "checkpoint_format": "gptq" if v1 else "gptq_v2"}}[method]
    return write_folder(tmp_path / name, cfg, tensors, qc), codes


def test_gptq_qweight_packs_input_rows():
    q = torch.arange(16).repeat(8, 1).t() % 16  # [16, 8]: row r holds r
    words = gptq_qweight(q.t().contiguous())  # weight [8 out, 16 in] -> [2, 8]
    assert words.shape == (2, 8)
    assert int(words[0, 0]) == 0x76543210 and int(words[1, 3]) & 0xF == 8


@pytest.mark.parametrize("method", ["q4", "q8"])
def test_ferry_form_dequantizes_exactly(tmp_path, tiny, method):
    cfg, state = tiny
    folder, codes = quantized_folder(tmp_path, cfg, state, method)
    reader = TensorReader(open_checkpoint(folder))
    for name, (q, mins, s) in codes.items():
        g = reader.grouped(name)
        assert g.bits == (4 if method == "q4" else 8) and g.group == GROUP
        expected = q.float() * s.float().repeat_interleave(GROUP, 1)
        if mins is not None:
            expected = expected + mins.float().repeat_interleave(GROUP, 1)
        torch.testing.assert_close(g.dequantize(), expected, atol=0, rtol=0)
        assert name in reader
        torch.testing.assert_close(reader.get(name, tuple(q.shape)), expected, atol=0, rtol=0)
    assert reader.grouped("model.layers.0.input_layernorm.weight") is None
    assert source_quant(open_checkpoint(folder)) == (4 if method == "q4" else 8, GROUP)


def check_zero_point(reader, codes, group):
    for name, (q, z, s) in codes.items():
        g = reader.grouped(name)
        gs = q.shape[1] if group == -1 else group
        # exact parts: codes, scales, and minimum = -(z * s) rounded once to fp16
        assert torch.equal(g.q.long(), q) and torch.equal(g.scale, s)
        assert torch.equal(g.minimum, (-(z.float() * s.float())).half())
        ref = zero_point_reference(q, z, s, gs)
        bound = 0.5 * np.spacing(np.abs((z.float() * s.float()).half().numpy())).astype(np.float64)
        bound = torch.from_numpy(bound).repeat_interleave(gs, 1) + 2.0 ** -22 * ref.abs().max()
        assert bool(((g.dequantize().double() - ref).abs() <= bound).all())
        torch.testing.assert_close(reader.get(name, tuple(q.shape)), g.dequantize(), atol=0, rtol=0)


def test_awq_gemm(tmp_path, tiny):
    cfg, state = tiny
    folder, codes = quantized_folder(tmp_path, cfg, state, "awq")
    check_zero_point(TensorReader(open_checkpoint(folder)), codes, GROUP)
    assert source_quant(open_checkpoint(folder)) == (4, GROUP)


@pytest.mark.parametrize("v1, sym, group", [(True, False, GROUP), (False, False, GROUP), (True, True, GROUP),
                                            (False, True, -1), (True, False, -1)])
def test_gptq(tmp_path, tiny, v1, sym, group):
    cfg, state = tiny
    folder, codes = quantized_folder(tmp_path, cfg, state, "gptq", group=group, v1=v1, sym=sym)
    check_zero_point(TensorReader(open_checkpoint(folder)), codes, group)
    assert source_quant(open_checkpoint(folder)) == (4, 64 if group == -1 else GROUP)  # -1: hidden-size rows


def test_loader_runs_packed_checkpoint_like_its_dequantized_floats(tmp_path, tiny):
    """Every float path (the unquantized loader here) reads a GPTQ folder as the fp32 weights
    q * s + fp16(-(z * s)), computed here independently and written as a plain float folder."""
    cfg, state = tiny
    folder, codes = quantized_folder(tmp_path, cfg, state, "gptq")
    floats = dict(state)
    for name, (q, z, s) in codes.items():
        r = lambda t: t.float().repeat_interleave(GROUP, 1)  # noqa: E731
        floats[name] = q.float() * r(s) + r((-(z.float() * s.float())).half())
    reference = write_folder(tmp_path / "floats", cfg, floats)
    assert source_quant(open_checkpoint(reference)) is None
    got, expected = [], []
    for target, out in ((folder, got), (reference, expected)):
        c, weights, rope, cache = load_tiny(target)
        out.append(prefill(c, weights, rope, cache, prompt_ids(7)))
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)


def rewrite(folder, name, tensor):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = tensor
    save_file(tensors, str(folder / "model.safetensors"))


def test_desc_act_with_scattered_groups_is_refused(tmp_path, tiny):
    cfg, state = tiny
    folder, _ = quantized_folder(tmp_path, cfg, state, "gptq")
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"]["desc_act"] = True
    (folder / "config.json").write_text(json.dumps(raw))
    reader = TensorReader(open_checkpoint(folder))
    assert reader.grouped("model.layers.0.mlp.up_proj.weight") is not None  # trivial g_idx reads fine
    name = "model.layers.0.mlp.up_proj.g_idx"
    rewrite(folder, name, (torch.randperm(64, generator=torch.Generator().manual_seed(0)) // GROUP).int())
    reader = TensorReader(open_checkpoint(folder))
    with pytest.raises(FerryError, match=r"model\.layers\.0\.mlp\.up_proj .*desc_act=False"):
        reader.get("model.layers.0.mlp.up_proj.weight", (128, 64))


@pytest.mark.parametrize("method, part, bad", [
    ("gptq", "qweight", torch.zeros(8, 127, dtype=torch.int32)),  # one output column short
    ("gptq", "scales", torch.ones(2, 128)),  # fp32, not fp16
    ("gptq", "qzeros", torch.zeros(2, 16, dtype=torch.int64)),
    ("awq", "qweight", torch.zeros(64, 15, dtype=torch.int32)),
    ("awq", "scales", torch.full((2, 128), float("nan"), dtype=torch.float16)),
    ("q4", "q4", torch.zeros(128, 31, dtype=torch.uint8)),
    ("q4", "mins", torch.zeros(128, 3, dtype=torch.float16)),
    ("q8", "q8", torch.full((128, 64), -128, dtype=torch.int8)),
    ("q8", "scales", torch.ones(128, 2, 1, dtype=torch.float16)),
])
def test_wrong_packed_tensor_is_one_error(tmp_path, tiny, method, part, bad):
    cfg, state = tiny
    folder, _ = quantized_folder(tmp_path, cfg, state, method)
    rewrite(folder, f"model.layers.1.mlp.up_proj.{part}", bad)
    reader = TensorReader(open_checkpoint(folder))
    with pytest.raises(FerryError, match=rf"model\.layers\.1\.mlp\.up_proj in .*{part}"):
        reader.get("model.layers.1.mlp.up_proj.weight", (128, 64))


def test_truncated_packed_file_is_an_error(tmp_path, tiny):
    cfg, state = tiny
    folder, _ = quantized_folder(tmp_path, cfg, state, "awq")
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(FerryError, match="truncated or corrupt"):
        TensorReader(open_checkpoint(folder)).get("model.layers.1.mlp.down_proj.weight", (64, 128))


def test_missing_packed_part_is_an_error(tmp_path, tiny):
    cfg, state = tiny
    folder, _ = quantized_folder(tmp_path, cfg, state, "q4")
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.mins"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(FerryError, match=r"k_proj\.mins is missing"):
        TensorReader(open_checkpoint(folder)).get("model.layers.0.self_attn.k_proj.weight", (32, 64))


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "'fp8' is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "exllama"}, "AWQ version 'exllama'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "8-bit GPTQ"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "3-bit GPTQ"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size"),
])
def test_unsupported_quantization_config_is_refused(tmp_path, tiny, qc, message):
    cfg, state = tiny
    folder = write_folder(tmp_path / "q", cfg, state, qc)
    with pytest.raises(FerryError, match=message) as err:
        open_checkpoint(folder)
    assert "ferry reads AWQ" in str(err.value) or "group_size" in message


def test_packed_tensors_without_quantization_config_are_refused(tmp_path, tiny):
    cfg, state = tiny
    folder, _ = quantized_folder(tmp_path, cfg, state, "awq")
    raw = json.loads((folder / "config.json").read_text())
    del raw["quantization_config"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FerryError, match="no quantization_config"):
        open_checkpoint(folder)


def test_autogptq_quantize_config_json_is_read(tmp_path, tiny):
    cfg, state = tiny
    folder, codes = quantized_folder(tmp_path, cfg, state, "gptq")
    raw = json.loads((folder / "config.json").read_text())
    qc = raw.pop("quantization_config")
    del qc["quant_method"]  # AutoGPTQ's file has none
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "quantize_config.json").write_text(json.dumps(qc))
    check_zero_point(TensorReader(open_checkpoint(folder)), codes, GROUP)

"""Quantized host weights: the row format, the packed layer layout, and every engine mode on it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import ferry
from ferry.cli import main
from ferry.errors import FerryError
from ferry.kernels import quant as kq
from ferry.kernels.quant_fit import fit_groups, quantize_rows
from ferry.kernels.gather import gather_rows
from ferry.model.config import ModelConfig
from ferry.model.dequant import dequantize_down, dequantize_layer, tile_numel
from ferry.model.quant import QuantConfig, QuantLayout, group_for, quantize_layer, write_down
from ferry.model.weights import LayerLayout
from ferry.offload.checkpoint import load_hf_config
from ferry.offload.planner import make_plan
from ferry.offload.sources import resolve_config

LLAMA_70B = Path(__file__).parent / "data" / "llama-3.1-70b-config.json"
PROMPTS = ["The capital of France", "def add(a, b):", "A quick brown fox"]


USER_CACHE = os.environ.get("FERRY_CACHE_DIR")


@pytest.fixture(autouse=True)
def quant_cache(tmp_path_factory, monkeypatch):
    """Quantized stores of the tiny test models go to a folder of this session, not ~/.cache."""
    root = tmp_path_factory.getbasetemp() / "ferry-cache"
    monkeypatch.setenv("FERRY_CACHE_DIR", str(root))
    return root


def use_user_cache(monkeypatch) -> None:
    """The default model's GGUF conversion (and its quantized stores) live in the user's cache."""
    if USER_CACHE is None:
        monkeypatch.delenv("FERRY_CACHE_DIR")
    else:
        monkeypatch.setenv("FERRY_CACHE_DIR", USER_CACHE)


def weights_like_a_model(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[1] = 0.0  # an all-zero row: scale 0, no division by zero
    w[2] *= 1e-4  # tiny weights: scales in fp16's subnormal range
    w[3, 5] = 3.0  # an outlier in one group
    return w


# --- the row format ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 96])
def test_plain_ranges_round_trip_within_about_half_a_step(bits, group):
    w = weights_like_a_model(16, 192)
    codes, scales, mins = quantize_rows(w, bits, group, fit=False)
    assert codes.dtype == torch.uint8 and codes.shape == (16, 192 * bits // 8)
    assert scales.dtype == torch.float16 and scales.shape == (16, 192 // group)
    assert (mins is None) == (bits == 8)
    back = kq.dequantize_reference(codes, scales, mins, bits, torch.float32)
    err = (back - w).abs().view(16, -1, group)
    s = scales.float()[..., None]
    # half a step, plus what rounding the scale (and min) to fp16 can add at the range's ends
    # (relative 2^-11 in the normal range, absolute 2^-25 below it)
    m = 0 if mins is None else mins.float().abs()[..., None]
    ends = (kq.QMAX[bits] + 1) * (s * 2 ** -11 + 2 ** -25) + m * 2 ** -11 + 2 ** -25
    assert (err <= s / 2 + ends).all()
    assert (back[1] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_fitted_ranges_are_never_worse_per_group_and_better_overall(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    err = {}
    for fit in (False, True):
        g = fit_groups(w, bits, 32, fit)
        err[fit] = (g.dequantize() - w).pow(2).view(64, -1, 32).sum(-1)
    assert (err[True] <= err[False] * (1 + 1e-6)).all()
    assert err[True].sum() < 0.9 * err[False].sum()


def test_int4_nibble_order_and_asymmetric_values():
    q = torch.tensor([[(i * 7) % 16 for i in range(64)]], dtype=torch.uint8)
    g = kq.Grouped(q, torch.tensor([[0.5, 2.0]], dtype=torch.float16),
                   torch.tensor([[-1.0, 3.0]], dtype=torch.float16), 4)
    codes, scales, mins = g.packed()
    assert codes[0].tolist() == [int(q[0, 2 * j]) | (int(q[0, 2 * j + 1]) << 4) for j in range(32)]
    assert kq.unpack_int4(codes).tolist() == q.tolist()
    want = [v * 0.5 - 1 for v in q[0, :32].tolist()] + [v * 2.0 + 3 for v in q[0, 32:].tolist()]
    assert kq.dequantize_reference(codes, scales, mins, 4, torch.float32)[0].tolist() == want
    assert g.dequantize()[0].tolist() == want


def test_int8_codes_are_twos_complement():
    w = torch.tensor([[127.0, -127.0, 0.0, -1.0] * 8])
    codes, scales, mins = quantize_rows(w, 8, 32, fit=False)
    assert scales.item() == 1.0 and mins is None
    assert codes[0, :4].tolist() == [127, 129, 0, 255]


@pytest.mark.parametrize("bad", [torch.tensor([[float("nan")] * 32]), torch.tensor([[1e6] + [0.0] * 31])])
def test_unquantizable_weights_are_named(bad):
    with pytest.raises(ValueError, match="NaN|too large"):
        fit_groups(bad, 4, 32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parallel", [False, True])
def test_dequantize_backends_equal_the_reference_on_strided_records(bits, dtype, parallel, monkeypatch):
    """Records interleave codes, scales and mins, so the backends see strided views, as in the executor."""
    monkeypatch.setattr(kq, "PARALLEL_MIN_VALUES", 0 if parallel else 1 << 40)
    cfg = model_config(192, 3, 1, 64)
    q = QuantLayout.for_config(cfg, QuantConfig(f"int{bits}", group_size=64))
    buf = torch.zeros(q.numel, dtype=torch.uint8)
    quantize_layer(q, random_layer(cfg), buf)
    codes, scales, mins, _ = q.mlp_records(buf, 0, 40)
    parts = (codes[:, :2], scales, mins)  # gate and up rows (down goes through the group table)
    want = kq.dequantize_reference(*parts, bits, dtype)
    out = torch.full((40, 2, 192), 7.0, dtype=dtype)
    torch.testing.assert_close(kq.dequantize_into(*parts, bits, out), want, atol=0, rtol=0)
    if dtype != torch.float16:  # numba: bf16 and fp32 only (fp16 takes the torch path)
        out.fill_(7.0)
        torch.testing.assert_close(kq.dequantize_numba(*parts, bits, out), want, atol=0, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_down_columns_are_the_checkpoint_groups_across_neurons(bits):
    """down_proj [H, I] keeps groups along I: the dequantized down columns equal the Grouped's
    own dequantization, read through each record's checkpoint index, in any neuron order."""
    cfg = model_config(192, 3, 1, 128)
    q = QuantLayout.for_config(cfg, QuantConfig(f"int{bits}"))
    down = fit_groups(weights_like_a_model(192, 128), bits, 32)
    buf = torch.zeros(q.numel, dtype=torch.uint8)
    write_down(q, buf, down)
    order = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    records = buf[q.mlp_offset:].view(128, q.row_numel)
    records.copy_(records.clone()[order])
    codes, _, _, index = q.mlp_records(buf, 0, 128)
    index.copy_(order.to(torch.int32))  # what write_records stores, gathered with the records
    got = dequantize_down(codes[:, 2], index, q.down_groups(buf), bits, q.group, torch.empty(128, 192))
    torch.testing.assert_close(got, down.dequantize().t()[order], atol=0, rtol=0)


# --- the layer layout -------------------------------------------------------------------------
def model_config(hidden=576, heads=9, kv=3, inter=1536, **extra) -> ModelConfig:
    raw = dict(model_type="llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
               num_attention_heads=heads, num_key_value_heads=kv, vocab_size=256, **extra)
    from ferry.offload.checkpoint import config_from_dict

    return ModelConfig.from_hf(config_from_dict(raw, "test"))


def test_group_size_is_the_largest_that_divides_every_row():
    assert group_for(model_config(576), QuantConfig("int4")) == 32
    assert group_for(model_config(576), QuantConfig("int4", group_size=128)) == 96  # 576 = 4.5 x 128
    assert group_for(model_config(8192, 64, 8), QuantConfig("int8", group_size=128)) == 128
    assert group_for(model_config(8192, 64, 8), QuantConfig("int8", group_size=64)) == 64
    with pytest.raises(FerryError, match="no group size"):
        group_for(model_config(100, 2, 1), QuantConfig("int4"))


@pytest.mark.parametrize("bad", [dict(method="int3"), dict(method="int4", group_size=20),
                                 dict(method="int8", group_size=100)])
def test_quant_config_rejects(bad):
    with pytest.raises(FerryError):
        QuantConfig(**bad)


def random_layer(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    base = LayerLayout.for_config(cfg)
    return torch.randn(base.numel, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_sparse_prefix_of_quantized_bytes_equals_dequantize_then_select(method, backend):
    cfg = model_config(192, 3, 1, 320, attention_bias=True)
    q = QuantLayout.for_config(cfg, QuantConfig(method, group_size=64))
    full = random_layer(cfg)
    packed = torch.empty(q.numel, dtype=torch.uint8)
    quantize_layer(q, full, packed)
    whole = torch.zeros(q.base.numel)
    dequantize_layer(q, packed, whole, cfg.intermediate_size, backend)
    k = 117
    part = torch.zeros(q.base.numel)
    dequantize_layer(q, packed[:q.prefix_numel(k)].clone(), part, k, backend)  # only the prefix bytes
    head = q.base.prefix_numel(k)
    torch.testing.assert_close(part[:head], whole[:head], atol=0, rtol=0)
    assert (part[head:] == 0).all()  # nothing past the used neurons was written
    err = (whole - full).abs().max()
    assert 0 < err < (0.05 * 8 / kq.QMAX[q.bits])  # close, not identical (fitting may clip outliers)
    w = q.base.views(whole)
    torch.testing.assert_close(w.attn_norm, q.base.views(full).attn_norm, atol=0, rtol=0)  # fp32 kept


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_reordering_records_equals_reordering_dequantized_neurons(method):
    cfg = model_config(192, 3, 1, 320)
    q = QuantLayout.for_config(cfg, QuantConfig(method))
    packed = torch.empty(q.numel, dtype=torch.uint8)
    quantize_layer(q, random_layer(cfg, 1), packed)
    before = torch.empty(q.base.numel)
    dequantize_layer(q, packed, before, cfg.intermediate_size, "torch")
    order = torch.randperm(cfg.intermediate_size, generator=torch.Generator().manual_seed(3))
    records = packed[q.mlp_offset:].view(cfg.intermediate_size, q.row_numel)
    gather_rows(records.clone(), order, records)
    after = torch.empty(q.base.numel)
    dequantize_layer(q, packed, after, cfg.intermediate_size, "torch")
    n = cfg.intermediate_size
    torch.testing.assert_close(q.base.bundle(after, 0, n), q.base.bundle(before, 0, n)[order], atol=0, rtol=0)


def test_layer_bytes_of_a_70b_layer():
    cfg = ModelConfig.from_hf(resolve_config(LLAMA_70B))
    h, inter, qkv = 8192, 28672, 8192 + 2 * 1024
    for method, per_value, per_group in (("int8", 1.0, 2), ("int4", 0.5, 4)):
        q = QuantLayout.for_config(cfg, QuantConfig(method))
        row = int(h * per_value) + per_group * h // 32  # codes + fp16 scales (+ mins), groups of 32
        table = inter // 32 * h * per_group  # down_proj's groups across neurons
        attention = 4 * h + qkv * row + h * row + 4 * h + table  # norms stay fp32
        assert q.mlp_offset == attention  # every section is already 16-byte aligned here
        unpadded = 3 * int(h * per_value) + 2 * per_group * h // 32 + 4  # codes, gate/up groups, index
        record = -(-unpadded // 16) * 16  # padded: every record starts 16-byte aligned
        assert q.index_offset == unpadded - 4 and q.row_numel == record
        assert q.numel == attention + inter * record
        assert q.prefix_numel(100) == attention + 100 * record


# --- the planner ------------------------------------------------------------------------------
def test_planner_counts_quantized_bytes():
    cfg = ModelConfig.from_hf(resolve_config(LLAMA_70B))
    common = dict(dtype_bytes=2, budget_bytes=24 << 30, host_available_bytes=1 << 40, ctx=4096,
                  device="cuda", sparsity=0.5)
    plans = {m: make_plan(cfg, quant=QuantConfig(m), **common) for m in ("none", "int8", "int4")}
    for m in ("int8", "int4"):
        p, q = plans[m], QuantLayout.for_config(cfg, QuantConfig(m))
        assert p.quant == m and p.quant_group == 32
        assert p.layer_bytes == q.numel and p.prefix_bytes == q.prefix_numel(28672 // 2)
        streamed, prefixes = len(p.streamed_layers), len(p.prefix_layers)
        row = 0 if p.embed_on_device else 8192 * 2
        assert p.link_bytes["full_pass"] == (streamed - prefixes) * q.numel + prefixes * (q.numel - p.prefix_bytes) + row
        assert p.link_bytes["sparse_step"] == (streamed - prefixes) * p.prefix_bytes + row
        head_tile = 4096 * 8192 * 2  # the int8 head is dequantized by tiles on CUDA
        assert p.workspace_bytes == plans["none"].workspace_bytes + tile_numel(LayerLayout.for_config(cfg)) * 2 + head_tile
        assert p.lm_head_quant == "int8" and p.lm_head_bytes == 128256 * (8192 + 8192 // 32 * 8)
    assert 0.31 < plans["int4"].layer_bytes / plans["none"].layer_bytes < 0.32  # 4 + 32 / 32 bits a weight
    assert 0.53 < plans["int8"].layer_bytes / plans["none"].layer_bytes < 0.54  # 8 + 16 / 32
    assert len(plans["none"].prefix_layers) < len(plans["int8"].prefix_layers) < len(plans["int4"].prefix_layers)


def test_plan_cli_with_quant(capsys):
    code = main(["plan", "-m", str(LLAMA_70B), "--quant", "int4", "--gpu-memory", "24GiB", "--host-memory",
                 "64GiB", "--device", "cuda", "--sparsity", "0.5", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["quant"] == "int4" and plan["quant_group"] == 32
    assert plan["prefix_layers"] and plan["link_bytes"]["sparse_step"] < plan["link_bytes"]["full_pass"]
    main(["plan", "-m", str(LLAMA_70B), "--quant", "int4", "--gpu-memory", "24GiB", "--host-memory", "64GiB",
          "--device", "cuda"])
    assert "int4, groups of 32 values with an fp16 scale and min" in capsys.readouterr().out


# --- the engine, end to end ---------------------------------------------------------------------
def fake_quantized_copy(src: Path, dst: Path, bits: int, group: int) -> Path:
    """The checkpoint with every layer weight replaced by its quantize-dequantize round trip (fp32),
    groups along each weight's input dimension, as the host store keeps them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(file)
        for name, t in tensors.items():
            if ".layers." in name and name.endswith("proj.weight"):
                tensors[name] = fit_groups(t, bits, group).dequantize().contiguous()
        save_file(tensors, str(file), metadata={"format": "pt"})
    return dst


def logits_of(engine, prompt: str) -> torch.Tensor:
    return engine.logits(engine.encode(prompt, chat=False))


def budget(folder, quant: QuantConfig, resident: int, depth: int = 2, prefixes: int = 0,
           sparsity: float = 0.5) -> int:
    """A device budget (fp32, ctx 64) leaving `resident` whole layers, `depth` slots and `prefixes`
    selected sets of streamed layers on the device."""
    cfg = ModelConfig.from_hf(load_hf_config(folder))
    p = make_plan(cfg, dtype_bytes=4, budget_bytes=1 << 40, host_available_bytes=1 << 40, ctx=64,
                  quant=quant, sparsity=sparsity)
    fixed = p.kv_cache_bytes + p.workspace_bytes + p.norm_bytes + (p.lm_head_bytes or p.embed_bytes)
    return fixed + (resident + depth) * p.layer_bytes + prefixes * p.prefix_bytes


@pytest.mark.parametrize("family, method, group", [("llama3", "int8", 128), ("llama3", "int4", 128),
                                                   ("qwen2", "int4", 32)])
def test_quantized_model_computes_with_its_dequantized_weights(method, group, family, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(family)
    quant = QuantConfig(method, group_size=group, lm_head="none")
    layout_group = group_for(ModelConfig.from_hf(load_hf_config(folder)), quant)
    reference = ferry.load(fake_quantized_copy(folder, tmp_path / "fake", quant.bits, layout_group),
                           dtype="fp32", ctx=64, progress=False)
    plain = ferry.load(folder, dtype="fp32", ctx=64, progress=False)
    # lm_head stays fp32 here, as in the reference (test_packed.py checks the int8 head)
    engines = {
        "resident": ferry.load(folder, dtype="fp32", ctx=64, progress=False, quant=method, quant_group=group,
                               quant_lm_head="none"),
        "streamed": ferry.load(folder, dtype="fp32", ctx=64, progress=False, quant=method, quant_group=group,
                               quant_lm_head="none", gpu_memory=budget(folder, quant, resident=0)),
        "one resident, emulated link": ferry.load(
            folder, dtype="fp32", ctx=64, progress=False, quant=method, quant_group=group, emulate_link_gbps=50.0,
            quant_lm_head="none", prefetch_depth=1, gpu_memory=budget(folder, quant, resident=1, depth=1)),
        "serial": ferry.load(folder, dtype="fp32", ctx=64, progress=False, quant=method, quant_group=group,
                             quant_lm_head="none", schedule="serial", gpu_memory=budget(folder, quant, resident=0)),
    }
    assert not engines["resident"].plan.streamed_layers
    assert len(engines["streamed"].plan.streamed_layers) == 4
    assert len(engines["one resident, emulated link"].plan.resident_layers) == 1
    want = logits_of(reference, PROMPTS[0])
    assert (want - logits_of(plain, PROMPTS[0])).abs().max() > 1e-4  # quantization changed something
    for name, engine in engines.items():
        torch.testing.assert_close(logits_of(engine, PROMPTS[0]), want, atol=2e-5, rtol=1e-5, msg=name)
        got = engine.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True)
        assert got.token_ids == reference.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True).token_ids
        engine.close()


@pytest.mark.parametrize("options", [
    dict(method="int8", family="llama3", sparsity=0.5, period=4),
    dict(method="int4", family="qwen2", sparsity=0.7, period=16),
    dict(method="int4", family="llama3", sparsity=0.5, sparse_method="cats"),
    dict(method="int8", family="qwen2", sparsity=0.5, stream="slots"),
    dict(method="int4", family="llama3", sparsity=0.5, stream="prefixes", emulate_link_gbps=50.0),
    dict(method="int8", family="llama3", sparsity=0.5, stream="prefixes", schedule="serial"),
    dict(method="int4", family="llama3", sparsity=0.5, sparse_method="cats", stream="slots"),
])
def test_strict_sirius_on_quantized_weights_equals_quantized_dense_greedy(options, tiny_model_dir):
    options = dict(options)
    method = options.pop("method")
    folder = tiny_model_dir(options.pop("family"))
    stream = options.pop("stream", None)
    common = dict(dtype="fp32", ctx=64, progress=False, quant=method)
    dense = ferry.load(folder, **common)
    if stream:  # every layer streams; with "prefixes", two layers keep their selected rows resident
        options["gpu_memory"] = budget(folder, QuantConfig(method), 0, prefixes=2 if stream == "prefixes" else 0)
    sparse = ferry.load(folder, accept="strict", **common, **options)
    if stream:
        assert len(sparse.plan.streamed_layers) == 4
        assert len(sparse.plan.prefix_layers) == (2 if stream == "prefixes" else 0)
    for prompt in PROMPTS:
        want = dense.generate(prompt, max_new_tokens=20, ignore_eos=True)
        got = sparse.generate(prompt, max_new_tokens=20, ignore_eos=True)
        assert got.token_ids == want.token_ids, prompt
        assert got.stats.mode == "sirius" and got.stats.full_passes >= 1
    sparse.close()


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("sparse_method", ["griffin", "cats"])
def test_sparse_mode_streamed_equals_resident_and_moves_quantized_bytes(method, sparse_method, tiny_model_dir):
    folder = tiny_model_dir("llama-tied")  # embeddings on the device: only layer bytes cross the link
    quant = QuantConfig(method)
    common = dict(dtype="fp32", ctx=64, progress=False, quant=method, sparsity=0.5, mode="sparse",
                  sparse_method=sparse_method)
    resident = ferry.load(folder, **common)
    streamed = ferry.load(folder, **common, schedule="serial", gpu_memory=budget(folder, quant, 0))
    n = 8
    for prompt in PROMPTS:
        want = resident.generate(prompt, max_new_tokens=n, ignore_eos=True)
        got = streamed.generate(prompt, max_new_tokens=n, ignore_eos=True)
        assert got.token_ids == want.token_ids
    p = streamed.plan
    per_sparse_step = p.prefix_bytes if sparse_method == "griffin" else p.layer_bytes  # CATS reads whole layers
    assert p.prefix_bytes < p.layer_bytes
    # Serial schedule: the prefill moves every layer once, then each sparse step its rows.
    assert got.stats.h2d_bytes == 4 * (p.layer_bytes + (n - 1) * per_sparse_step)


def test_second_load_reads_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    import ferry.offload.quant_store as store

    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path))
    folder = tiny_model_dir("llama3")
    first = ferry.load(folder, dtype="fp32", ctx=64, progress=False, quant="int4")
    files = list((tmp_path / "quant").iterdir())
    assert len(files) == 1 and files[0].suffix == ".bin"  # nothing left under a temporary name
    want = first.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).token_ids

    calls = []
    real = store.pack_quant_layer
    monkeypatch.setattr(store, "pack_quant_layer", lambda *a: (calls.append(1), real(*a))[1])
    again = ferry.load(folder, dtype="fp32", ctx=64, progress=False, quant="int4")
    assert not calls  # read from the cache
    assert again.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).token_ids == want
    files[0].write_bytes(files[0].read_bytes()[:100])  # a damaged cache file is rebuilt
    with pytest.warns(UserWarning, match="ignoring the quantized cache"):
        rebuilt = ferry.load(folder, dtype="fp32", ctx=64, progress=False, quant="int4")
    assert len(calls) == 4
    assert rebuilt.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).token_ids == want
    ferry.load(folder, dtype="fp32", ctx=64, progress=False, quant="int8")
    assert len(list((tmp_path / "quant").iterdir())) == 2  # one file per method


def test_generate_cli_with_quant(tiny_model_dir, capsys):
    folder = tiny_model_dir()
    code = main(["generate", "-m", str(folder), "-p", "The capital", "-n", "5", "--json", "--ctx", "64",
                 "--dtype", "fp32", "--quant", "int4", "--sparsity", "0.5",
                 "--gpu-memory", str(budget(folder, QuantConfig("int4"), 0))])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["stats"]["new_tokens"] == 5 and result["stats"]["h2d_bytes"] > 0


@pytest.mark.parametrize("argv, message", [
    (["generate", "-p", "hi", "--quant-group", "64"], "--quant-group needs --quant"),
    (["generate", "-p", "hi", "--quant", "int4", "--quant-group", "20"], "--quant-group must be"),
    (["plan", "--quant-group", "64"], "--quant-group needs --quant"),
])
def test_bad_quant_flags_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_quant_method_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "-p", "hi", "--quant", "int3"])
    assert info.value.code == 2 and "--quant" in capsys.readouterr().err
    with pytest.raises(FerryError, match="quant must be one of"):
        ferry.load(quant="int3", progress=False)


def test_model_without_a_valid_group_size_exits_2(tmp_path, capsys):
    raw = dict(model_type="llama", hidden_size=100, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, vocab_size=256)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert main(["plan", "-m", str(tmp_path / "config.json"), "--quant", "int8"]) == 2
    assert "no group size" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_default_model_quantized_still_knows_paris(method, monkeypatch):
    use_user_cache(monkeypatch)
    engine = ferry.load(quant=method, progress=False)
    text = engine.generate("What is the capital of France?", max_new_tokens=12).text
    assert "Paris" in text
    assert engine.plan.quant_group == 32

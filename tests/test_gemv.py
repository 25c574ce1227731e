"""Products on quantized bytes in place (`ferry.kernels.gemv`, Triton kernels) against the
reference: dequantize, then the plain product. On the CPU the kernels run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), in fp32 and fp16; on CUDA they compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ferry
from ferry.kernels import gemv
from ferry.kernels.quant_fit import fit_groups
from ferry.model import packed
from ferry.model.dequant import QuantNeurons, QuantRows, dequantize_down, dequantize_layer, quant_views, vector_buffers
from ferry.model.quant import QuantConfig, QuantLayout, quantize_layer
from test_quant import budget, model_config, random_layer

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = ["The capital of France", "def add(a, b):"]
# the interpreter holds bf16 in numpy wrongly: bf16 is checked where the kernels compile
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setattr(gemv, "ENABLED", True)
    torch.manual_seed(0)  # the activations below: the same draws every run


def quantized(method: str, inter: int = 320):
    cfg = model_config(192, 3, 1, inter, attention_bias=True)
    q = QuantLayout.for_config(cfg, QuantConfig(method))
    raw = torch.empty(q.numel, dtype=torch.uint8)
    quantize_layer(q, random_layer(cfg, 3), raw)
    return cfg, q, raw.to(DEVICE)


def views(q, raw, dtype, rows=None):
    rows = q.intermediate_size if rows is None else rows
    vectors = vector_buffers(q.base, dtype, raw.device)
    work = torch.empty(4 * 3 * q.hidden_size, dtype=dtype, device=raw.device)  # tiles of 4 neurons
    for sec in q.sections:
        if len(sec.shape) == 1:
            vectors[sec.name].copy_(raw[sec.offset:sec.offset + sec.size].view(torch.float32))
    return quant_views(q, raw, vectors, rows, work, "torch")


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_rows_in_place_equal_dequantize_then_linear(method, dtype, tokens):
    cfg, q, raw = quantized(method)
    w = views(q, raw, dtype)
    flat = torch.zeros(q.base.numel, dtype=dtype, device=DEVICE)
    dequantize_layer(q, raw, flat, q.intermediate_size, "torch")
    ref = q.base.views(flat)
    x = torch.randn(tokens, cfg.hidden_size, device=DEVICE).to(dtype)
    assert isinstance(w.qkv, QuantRows) and gemv.usable(x)
    torch.testing.assert_close(w.qkv.linear(x), F.linear(x, ref.qkv), **tolerance(dtype))
    # gate rows of the neuron records: rows a record apart
    codes, scales, mins, _ = w.mlp[0].records
    got = gemv.rows_linear(x, codes[:, 0], scales[:, 0], None if mins is None else mins[:, 0], q.bits)
    torch.testing.assert_close(got, F.linear(x, ref.mlp[0][:, 0]), **tolerance(dtype))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tokens", [1, 2])
def test_long_rows_take_several_blocks(bits, tokens):
    """Rows of 640 values: several blocks along the row, the last one partly masked."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 640, generator=gen) * 0.05  # a layer's scale, as random_layer
    grouped = fit_groups(w, bits, 64, fit=False)
    codes, scales, mins = (None if t is None else t.to(DEVICE) for t in grouped.packed())
    x = torch.randn(tokens, 640, generator=gen).to(DEVICE)
    ref = x @ grouped.dequantize().to(DEVICE).t()
    torch.testing.assert_close(gemv.rows_linear(x, codes, scales, mins, bits), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, programs", [(1, 1), (1, 64), (5, 64)])
def test_down_columns_in_place_equal_their_dequantized_columns(method, dtype, tokens, programs):
    cfg, q, raw = quantized(method)
    order = torch.randperm(q.intermediate_size, generator=torch.Generator().manual_seed(1))
    records = raw[q.mlp_offset:].view(q.intermediate_size, q.row_numel)
    records.copy_(records[order.to(DEVICE)])  # a Griffin reorder: neurons from every group, mixed
    codes, _, _, index = q.mlp_records(raw, 0, 200)
    table = q.down_groups(raw)
    z = torch.randn(tokens, 200, device=DEVICE).to(dtype)
    columns = torch.empty(200, cfg.hidden_size, dtype=dtype, device=DEVICE)
    dequantize_down(codes[:, 2], index, table, q.bits, q.group, columns)
    got = gemv.columns_linear(z, codes[:, 2], index, table, q.bits, q.group, programs=programs)
    torch.testing.assert_close(got, z @ columns, **tolerance(dtype))


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4])
def test_gate_and_up_rows_in_one_launch(method, dtype, tokens):
    """Records' gate and up rows as two parts of each record: one launch, [M, 2, n]."""
    cfg, q, raw = quantized(method)
    codes, scales, mins, _ = q.mlp_records(raw, 0, 150)
    x = torch.randn(tokens, cfg.hidden_size, device=DEVICE).to(dtype)
    both = gemv.rows_linear(x, codes[:, :2], scales, mins, q.bits)
    assert both.shape == (tokens, 2, 150)
    for j in range(2):
        one = gemv.rows_linear(x, codes[:, j], scales[:, j], None if mins is None else mins[:, j], q.bits)
        torch.testing.assert_close(both[:, j], one, rtol=1e-6, atol=1e-6)


def gate_at_boundary(dtype):
    """A threshold just above a value t of the dtype (torch compares with it rounded: t), and a
    gate whose SiLU is exactly t: kept by the reference, dropped by an unrounded comparison.
    fp32 has no rounding to test, and a GPU's fp32 exp and division may put SiLU an ulp or two
    off torch's: there the threshold sits a few ulps under t, so the neuron is kept either way."""
    gate = torch.tensor(0.5, dtype=dtype)
    t = F.silu(gate).item()
    eps = torch.finfo(dtype).eps
    # a quarter of eps * t is under half the dtype's spacing at t: rounds back to t
    return (t + eps * t / 4 if dtype != torch.float32 else t * (1 - 8 * eps)), gate.item()


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("thresholded", [False, True])
def test_gated_down_columns_equal_gated_then_columns(method, dtype, tokens, thresholded):
    """The down product given gate and up products forms SiLU(gate) * up itself, threshold and
    roundings as `reference.gated`."""
    from ferry.kernels.reference import gated

    cfg, q, raw = quantized(method)
    codes, _, _, index = q.mlp_records(raw, 0, 200)
    table = q.down_groups(raw)
    gate_up = (torch.randn(tokens, 2, 200, device=DEVICE) * 2).to(dtype)
    threshold, boundary = gate_at_boundary(dtype) if thresholded else (None, 0.0)
    gate_up[0, 0, 0], gate_up[0, 1, 0] = boundary, 50.0  # a neuron that moves the sums if dropped
    got = gemv.columns_linear(gate_up, codes[:, 2], index, table, q.bits, q.group, threshold=threshold)
    _, z = gated(gate_up[:, 0], gate_up[:, 1], threshold)
    want = gemv.columns_linear(z, codes[:, 2], index, table, q.bits, q.group)
    torch.testing.assert_close(got, want, **tolerance(dtype))
    if thresholded:
        assert z[0, 0] != 0 and (z == 0).any()  # the boundary neuron kept, others dropped


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("threshold", [None, 0.02])
@pytest.mark.parametrize("observed", [True, False])  # observed: activations formed apart, for the observer
def test_mlp_on_records_equals_the_tiled_mlp(method, threshold, observed, monkeypatch):
    cfg, q, raw = quantized(method)
    part = views(q, raw, torch.float32, rows=150).mlp[0]
    assert isinstance(part, QuantNeurons)
    x = torch.randn(2, cfg.hidden_size, device=DEVICE)
    seen = {}
    got = part.mlp(x, threshold, (lambda a, z: seen.setdefault("got", (a, z))) if observed else None)
    monkeypatch.setattr(gemv, "ENABLED", False)
    tiles = []
    want = part.mlp(x, threshold, lambda a, z: tiles.append((a, z)))
    assert len(tiles) > 1  # the reference ran tile by tile
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if observed:
        for mine, theirs in zip(seen["got"], (torch.cat(t, dim=-1) for t in zip(*tiles))):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_int8_head_in_place_equals_its_groups_dequantized(monkeypatch):
    from ferry.model.packed import GroupedMatrix, int8_head

    monkeypatch.setattr(packed, "ENABLED", False)
    w = torch.randn(300, 96, generator=torch.Generator().manual_seed(7))
    grouped = fit_groups(w, 8, 32, fit=False)
    head = int8_head((300, 96), 32, iter([(0, grouped)]), torch.device(DEVICE), torch.float32)
    assert isinstance(head, GroupedMatrix)
    x = torch.randn(1, 96, device=DEVICE)
    torch.testing.assert_close(head.linear(x), x @ grouped.dequantize().to(DEVICE).t(), rtol=1e-5, atol=1e-5)


def test_wide_passes_and_other_devices_stay_on_tiles(monkeypatch):
    x = torch.zeros(gemv.MAX_ROWS + 1, 8)
    assert not gemv.usable(x) and gemv.usable(x[:gemv.MAX_ROWS])
    monkeypatch.setattr(gemv, "ENABLED", None)  # automatic: CUDA only
    assert gemv.available("cuda") and not gemv.available("cpu")
    monkeypatch.setattr(gemv, "ENABLED", False)
    assert not gemv.available("cuda")


# --- whole engines on records read in place ---------------------------------------------------
@pytest.fixture
def few_programs(monkeypatch):
    """Fewer, larger programs: the interpreter's cost is per program (the blocks' sizes and the
    neuron split are covered above)."""
    for name in ("BLOCK_R", "BLOCK_R1"):
        monkeypatch.setattr(gemv, name, 128)
    monkeypatch.setattr(gemv, "PROGRAMS", 1)


def load(folder, **options):
    """An engine whose resident layers stay as records (the CPU would pack them for its kernel);
    whether products read them in place is decided at each call, by gemv.ENABLED."""
    packed.ENABLED = False
    try:
        return ferry.load(folder, **{"dtype": "fp32", "ctx": 64, "progress": False, **options})
    finally:
        packed.ENABLED = None


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of the in-place kernels, counted."""
    calls = {"rows": 0, "columns": 0}
    rows, columns = gemv.rows_linear, gemv.columns_linear

    def counted_rows(*args, **kwargs):
        calls["rows"] += 1
        return rows(*args, **kwargs)

    def counted_columns(*args, **kwargs):
        calls["columns"] += 1
        return columns(*args, **kwargs)
    monkeypatch.setattr(gemv, "rows_linear", counted_rows)
    monkeypatch.setattr(gemv, "columns_linear", counted_columns)
    return calls


def run(engine, kernels: bool, prompt: str, monkeypatch):
    """Logits over the prompt (up to 16 tokens: the kernels' width too) and 6 greedy tokens."""
    monkeypatch.setattr(gemv, "ENABLED", kernels)
    return engine.logits(engine.encode(prompt)), engine.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids


@pytest.mark.parametrize("family, method, streamed", [
    ("llama3", "int4", False), ("qwen2", "int8", False),
    pytest.param("qwen2", "int4", True, marks=pytest.mark.skipif(DEVICE == "cuda", reason="a CPU plan's budget"))])
def test_engine_on_records_in_place_equals_tiled_engine(family, method, streamed, tiny_model_dir, quant_cache,
                                                        few_programs, kernel_calls, monkeypatch):
    folder = tiny_model_dir(family)
    options = dict(quant=method)
    if streamed:  # one layer resident, three streamed through one slot (a plain head)
        options.update(quant_lm_head="none", prefetch_depth=1,
                       gpu_memory=budget(folder, QuantConfig(method, lm_head="none"), resident=1, depth=1))
    engine = load(folder, **options)
    assert len(engine.plan.streamed_layers) == (3 if streamed else 0)
    for prompt in PROMPTS:
        want_logits, want = run(engine, False, prompt, monkeypatch)
        assert kernel_calls == {"rows": 0, "columns": 0}  # the reference: tiles only
        got_logits, got = run(engine, True, prompt, monkeypatch)
        assert kernel_calls["rows"] > 0 and kernel_calls["columns"] > 0
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        assert got == want
        kernel_calls.update(rows=0, columns=0)


@pytest.mark.parametrize("options", [dict(sparse_method="griffin", sparsity=0.5, period=4),
                                     dict(sparse_method="cats", sparsity=0.5, period=4)])
def test_strict_sirius_on_records_in_place_equals_dense(options, tiny_model_dir, quant_cache, few_programs):
    folder = tiny_model_dir("llama3")  # gemv.ENABLED: True throughout (the autouse fixture)
    dense = load(folder, quant="int4")
    sparse = load(folder, quant="int4", accept="strict", **options)
    for prompt in PROMPTS:
        got = sparse.generate(prompt, max_new_tokens=8, ignore_eos=True)
        assert got.token_ids == dense.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids
        assert got.stats.mode == "sirius" and got.stats.sparse_steps > 0


@pytest.fixture
def quant_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))

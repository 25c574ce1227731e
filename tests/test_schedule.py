"""The correction scheduler: the schedule as data, the executor following it, speculation, and the
serial oracle (pipelined and serial give the same tokens, with and without speculation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ferry
from ferry.cli import main
from ferry.model.config import ModelConfig
from ferry.model.weights import Kind
from ferry.offload.planner import make_plan
from ferry.offload.sources import resolve_config
from ferry.scheduler.correction import CorrectionConfig, decode_sirius
from ferry.scheduler.decode import DecodeStats
from ferry.scheduler.schedule import chunk_schedule, spread
from helpers import EOS, PROMPTS, MockPasses, truth

LLAMA_70B = Path(__file__).parent / "data" / "llama-3.1-70b-config.json"
GiB = 1 << 30


def plan_70b(budget_gib: float, prefix_resident: bool = True, depth: int = 2):
    cfg = ModelConfig.from_hf(resolve_config(str(LLAMA_70B)))
    return make_plan(cfg, dtype_bytes=2, budget_bytes=int(budget_gib * GiB), host_available_bytes=1 << 50,
                     ctx=4096, prefetch_depth=depth, device="cuda", sparsity=0.5,
                     prefix_resident=prefix_resident)


def computes(steps, **match):
    return [s for s in steps if s.track == "compute" and all(getattr(s, k) == v for k, v in match.items())]


def copies(steps):
    return [s for s in steps if s.track == "copy"]


# --- the schedule as data ---------------------------------------------------------------------
@pytest.mark.parametrize("steps, layers", [(15, 80), (3, 4), (7, 7), (9, 4), (1, 30)])
def test_spread_places_every_step_once_and_the_last_after_the_last_layer(steps, layers):
    counts = spread(steps, layers)
    assert sum(counts) == steps and counts[-1] >= 1 and max(counts) - min(counts) <= 1 + steps // layers


def test_resident_sparse_set_streams_only_the_complement_during_the_full_pass():
    plan = plan_70b(100)  # every layer keeps its selected neurons on the device
    assert len(plan.prefix_layers) == plan.num_layers - len(plan.resident_layers) > 0
    steps = chunk_schedule(plan, sparse_steps=15, speculative=15)
    moved = copies(steps)
    assert all(c.kind == Kind.FULL and c.span == (plan.prefix_bytes, plan.layer_bytes) for c in moved)
    assert sorted(c.layer for c in moved) == sorted(plan.streamed_layers)  # each once per chunk
    assert len(computes(steps, kind=Kind.SPARSE, speculative=False)) == 15 * plan.num_layers
    assert all(c.slot is None for c in computes(steps, kind=Kind.SPARSE))
    # The first `depth` fetches of the next chunk are issued during this chunk's full pass, so
    # they are in flight while the next chunk's sparse steps run.
    assert [c.carried for c in moved].count(True) == plan.prefetch_depth


def test_pipelined_issues_each_fetch_depth_ahead_and_serial_fetches_on_demand():
    plan = plan_70b(24, prefix_resident=False, depth=3)
    pipelined = chunk_schedule(plan, sparse_steps=2)
    for i, step in enumerate(pipelined):
        if step.track == "copy":
            used = pipelined[i - 1]  # the compute whose release frees the slot
            assert used.track == "compute" and used.slot == step.slot
    serial = chunk_schedule(plan, sparse_steps=2, pipelined=False)
    for i, step in enumerate(serial):
        if step.track == "copy":
            nxt = serial[i + 1]
            assert (nxt.track, nxt.kind, nxt.layer, nxt.slot) == ("compute", step.kind, step.layer, step.slot)
    # Published-style residency: a sparse step streams every layer's selected prefix.
    sparse_fetches = [c for c in copies(serial) if c.kind == Kind.SPARSE]
    assert len(sparse_fetches) == 2 * len(plan.streamed_layers)
    assert all(c.span == (0, plan.prefix_bytes) for c in sparse_fetches)


def test_speculative_steps_are_interleaved_with_the_full_pass():
    plan = plan_70b(100)
    steps = chunk_schedule(plan, sparse_steps=16, speculative=15)
    order = [(s.kind, s.speculative) for s in steps if s.track == "compute"]
    first_full = order.index((Kind.FULL, False))
    assert all(o == (Kind.SPARSE, False) for o in order[:first_full])
    spec = [i for i, o in enumerate(order) if o[1]]
    assert len(spec) == 15 * plan.num_layers and spec[0] > first_full
    with pytest.raises(ValueError, match="resident"):
        chunk_schedule(plan_70b(24, prefix_resident=False), sparse_steps=3, speculative=3)


def test_plan_prints_the_schedule(capsys):
    code = main(["plan", "-m", str(LLAMA_70B), "--device", "cuda", "--gpu-memory", "100GiB",
                 "--host-memory", "1TB", "--sparsity", "0.5", "--show-schedule", "--period", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "full pass:" in out and "speculative step 0:" in out and "for the next chunk" in out
    code = main(["plan", "-m", str(LLAMA_70B), "--device", "cuda", "--gpu-memory", "100GiB",
                 "--host-memory", "1TB", "--sparsity", "0.5", "--schedule", "serial", "--show-schedule",
                 "--no-speculate", "--json"])
    import json

    out = json.loads(capsys.readouterr().out)
    schedule = out["steps"]
    assert code == 0 and not any(s["speculative"] for s in schedule)
    assert sum(s["track"] == "copy" for s in schedule) == len(out["streamed_layers"]) > 0


# --- the executor follows the schedule ------------------------------------------------------------
SPARSITY = 0.75  # tiny models: the selected prefixes of all 4 layers plus 2 slots stay under 4 layers


def all_prefix_budget(cfg, ctx: int, depth: int = 2, quant: str = "none", sparsity: float = SPARSITY) -> int:
    """A device budget where every layer streams but keeps its selected neurons resident."""
    from ferry.model.quant import QuantConfig

    p = make_plan(cfg, dtype_bytes=4, budget_bytes=1 << 40, host_available_bytes=1 << 40, ctx=ctx,
                  sparsity=sparsity, quant=QuantConfig(method=quant, group_size=32))
    fixed = p.kv_cache_bytes + p.workspace_bytes + p.norm_bytes + (p.lm_head_bytes or p.embed_bytes)
    return fixed + depth * p.layer_bytes + cfg.num_layers * p.prefix_bytes + 64


def run_chunk(engine, passes, drafts: int, speculative: int) -> None:
    """One chunk driven the way decode_sirius drives it: sparse steps, then the full pass with
    speculative steps between its layers."""
    cache = passes.cache
    start = cache.length
    passes.expect([Kind.SPARSE] * drafts + [Kind.FULL, Kind.SPARSE])
    for _ in range(drafts):
        passes.sparse_step(3)
    counts = spread(speculative, engine.model.num_layers) if speculative else None

    def between(layer):
        for _ in range(counts[layer]):
            passes.sparse_step(5)

    tokens = torch.full((drafts + 1,), 4, dtype=torch.long)
    passes.full(tokens, start, between if counts else None)
    cache.rollback(start + 1)


@pytest.mark.parametrize("case", ["prefixes", "prefixes-speculative", "streamed", "streamed-serial"])
def test_executor_trace_matches_the_schedule(case, tiny_model_dir):
    from ferry.engine.generation import make_passes, prefill
    from ferry.engine.runtime import ensure_context

    folder = tiny_model_dir("llama3")
    probe = ferry.load(folder, dtype="fp32", ctx=64, progress=False)
    cfg = probe.model
    budget = all_prefix_budget(cfg, 64) if case.startswith("prefixes") else None
    if budget is None:
        from helpers import streaming_budget

        budget = streaming_budget(cfg, resident=1, depth=2, ctx=64)
    # "streamed": no selected set stays (the planner would otherwise give up a slot to keep them all)
    engine = ferry.load(folder, dtype="fp32", ctx=64, progress=False, sparsity=SPARSITY, gpu_memory=budget,
                        schedule="serial" if case.endswith("serial") else "pipelined", emulate_link_gbps=50.0,
                        resident_sparse=case.startswith("prefixes"))
    rt = engine.runtime
    ex = rt.executor
    ensure_context(rt, 8, 40)
    prefill(rt, list(range(3, 11)), DecodeStats())
    passes = make_passes(rt, rt.weights, rt.sparse_weights)
    assert passes.sparse_resident == case.startswith("prefixes")
    drafts, spec = 3, (3 if case.endswith("speculative") else 0)
    run_chunk(engine, passes, drafts, spec)  # reach the steady state
    ex.trace = []
    run_chunk(engine, passes, drafts, spec)
    trace = ex.trace
    engine.close()
    want = chunk_schedule(engine.plan, sparse_steps=drafts, speculative=spec, pipelined=not case.endswith("serial"))
    first_slot = next(t[3] for t in trace if t[0] == "compute" and t[3] is not None)
    b = engine.plan.dtype_bytes

    def norm(entry):
        if entry[0] == "fetch":
            _, kind, layer, slot, lo, hi = entry
            return ("copy", kind, layer, (slot - first_slot) % ex.depth, (lo * b, hi * b))
        _, kind, layer, slot = entry
        return ("compute", kind, layer, None if slot is None else (slot - first_slot) % ex.depth, None)

    got = [norm(t) for t in trace]
    expected = [(s.track, s.kind, s.layer, s.slot, s.span) for s in want]
    assert got == expected


# --- speculation in the decode loop ------------------------------------------------------------------
def run_mock(passes, speculate, max_new=40, period=4, accept="strict"):
    stats = DecodeStats()
    cfg = CorrectionConfig(mode="sirius", period=period, accept=accept)
    out = list(decode_sirius(passes, 7, max_new, lambda l: int(l.argmax()), frozenset({EOS}), stats, cfg,
                             speculate=speculate, layers=MockPasses.LAYERS))
    return out, stats


def mock_cases():
    f = truth()
    wrong_every_5th = {p: (t if p % 5 else t % 17 + 2) for p, t in f.items()}
    with_eos = dict(f)
    with_eos[22] = EOS
    return {"all accepted": (f, dict(f)), "mixed": (f, wrong_every_5th),
            "always wrong": (f, {p: t % 17 + 2 for p, t in f.items()}), "eos": (with_eos, dict(with_eos))}


@pytest.mark.parametrize("name", list(mock_cases()))
@pytest.mark.parametrize("max_new, period, capacity", [(40, 4, 100), (13, 4, 100), (30, 6, 30), (9, 16, 100)])
def test_speculation_commits_the_same_tokens_in_strict_mode(name, max_new, period, capacity):
    full, sparse = mock_cases()[name]
    base, base_stats = run_mock(MockPasses(full, sparse, capacity=capacity), False, max_new, period)
    passes = MockPasses(full, sparse, capacity=capacity)
    got, stats = run_mock(passes, True, max_new, period)
    assert got == base
    assert stats.finish_reason == base_stats.finish_reason
    assert stats.full_passes <= base_stats.full_passes  # s0 replaces the bonus, one pass each
    # Every committed token was seen by the full model at its position.
    committed = [7] + got[1:]
    assert all(passes.checked_at[5 + i] == t for i, t in enumerate(committed[:-1]))


def test_speculation_keeps_the_continuation_when_everything_is_accepted():
    f = truth()
    passes = MockPasses(f, dict(f))
    out, stats = run_mock(passes, True, max_new=40, period=4)
    assert out == [7] + [f[p] for p in range(5, 44)]
    assert stats.speculative_kept == stats.full_passes - 1 > 5
    assert stats.speculative_steps > 0 and stats.corrections == 0
    # After the first chunk the drafts come from the continuation: before each pass only the one
    # sparse step that proposes s0 runs.
    assert stats.sparse_steps - stats.speculative_steps <= 3 + stats.full_passes


def test_rejected_speculation_is_discarded_and_the_cache_rolled_back():
    f = truth()
    wrong = {p: (t % 17 + 2) for p, t in f.items()}
    passes = MockPasses(f, wrong)
    out, stats = run_mock(passes, True, max_new=10, period=4)
    assert out == [7] + [f[p] for p in range(5, 14)]
    assert stats.speculative_kept == 0 and stats.speculative_steps > 0
    assert stats.accepted == 0 and stats.sparse_steps - stats.accepted > stats.speculative_steps


# --- the serial executor is the oracle ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama-tied", "qwen2-tied"])  # tied: no embedding uploads
@pytest.mark.parametrize("accept", ["strict", "threshold"])
def test_pipelined_equals_serial_with_and_without_speculation(family, accept, tiny_model_dir):
    folder = tiny_model_dir(family)
    probe = ferry.load(folder, dtype="fp32", ctx=64, progress=False)
    budget = all_prefix_budget(probe.model, 64)
    prompts = PROMPTS[:2]
    dense = [probe.generate(p, max_new_tokens=20, ignore_eos=True).token_ids for p in prompts]
    results = {}
    for speculate in (True, False):
        for schedule in ("serial", "pipelined"):
            engine = ferry.load(folder, dtype="fp32", ctx=64, progress=False, sparsity=SPARSITY, accept=accept,
                                threshold=0.3, period=4, gpu_memory=budget,
                                emulate_link_gbps=50.0 if accept == "strict" else None,  # async copies once
                                schedule=schedule, speculate=speculate)
            assert len(engine.plan.prefix_layers) == engine.model.num_layers
            runs = [engine.generate(p, max_new_tokens=20, ignore_eos=True) for p in prompts]
            engine.close()
            results[speculate, schedule] = [r.token_ids for r in runs]
            assert (sum(r.stats.speculative_steps for r in runs) > 0) == speculate
    for speculate in (True, False):
        assert results[speculate, "pipelined"] == results[speculate, "serial"]
    if accept == "strict":
        assert results[True, "pipelined"] == results[False, "pipelined"] == dense


def test_profile_reports_speculative_steps_as_their_own_phase(tiny_model_dir):
    from ferry.profile import predict_run, profile_generation, summarize

    folder = tiny_model_dir("llama-tied")
    budget = all_prefix_budget(ferry.load(folder, dtype="fp32", ctx=64, progress=False).model, 64)
    engine = ferry.load(folder, dtype="fp32", ctx=64, progress=False, sparsity=SPARSITY, period=4,
                        gpu_memory=budget, emulate_link_gbps=50.0)
    run = profile_generation(engine, PROMPTS[0], max_new_tokens=16, ignore_eos=True)
    report = summarize(engine, run, predict_run(engine, run))
    engine.close()
    stats = run.generation.stats
    phases = report["phases"]
    assert phases["speculative_step"]["count"] == stats.speculative_steps > 0
    assert phases["sparse_step"]["count"] + phases["speculative_step"]["count"] == stats.sparse_steps
    # Speculative steps run inside full passes but are not counted twice.
    in_passes = sum(p["total_s"] for p in phases.values())
    assert in_passes <= report["total_s"]
    full = [p for p in run.passes if p["phase"] == "full_pass"]
    assert sum(p["speculative_s"] for p in full) == pytest.approx(phases["speculative_step"]["total_s"])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_speculation_on_quantized_weights_keeps_strict_equal_to_quantized_dense(quant, tiny_model_dir):
    folder = tiny_model_dir("qwen2-tied")
    q = dict(dtype="fp32", ctx=64, progress=False, quant=quant, quant_group=32)
    dense = ferry.load(folder, **q)
    # The quantized attention part carries down_proj's group table, a large share of a tiny
    # layer: at 0.9 four selected prefixes and two slots still stay under four whole layers.
    budget = all_prefix_budget(dense.model, 64, quant=quant, sparsity=0.9)
    engine = ferry.load(folder, **q, sparsity=0.9, accept="strict", period=4, gpu_memory=budget,
                        emulate_link_gbps=50.0)
    assert len(engine.plan.prefix_layers) == engine.model.num_layers
    for prompt in PROMPTS[:2]:
        want = dense.generate(prompt, max_new_tokens=16, ignore_eos=True)
        got = engine.generate(prompt, max_new_tokens=16, ignore_eos=True)
        assert got.token_ids == want.token_ids
        assert got.stats.speculative_steps > 0
    engine.close()
    # Resident sparse steps dequantize their own rows: sparse decoding from the resident
    # selected rows equals sparse decoding that streams them.
    sparse = dict(q, sparsity=SPARSITY, mode="sparse", gpu_memory=budget, emulate_link_gbps=50.0)
    resident = ferry.load(folder, **sparse)
    streamed = ferry.load(folder, **sparse, resident_sparse=False)
    assert resident.plan.prefix_layers and not streamed.plan.prefix_layers
    for prompt in PROMPTS[:2]:
        want = streamed.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
        assert resident.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids == want
    resident.close()
    streamed.close()

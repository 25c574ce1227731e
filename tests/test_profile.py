"""`ferry profile`: the report's numbers agree with the generation, the trace is a valid Chrome
trace with separate copy and compute tracks, and profiling off adds nothing to the engine."""

from __future__ import annotations

import json

import pytest

import ferry
import ferry.engine.engine
import ferry.profile.profiler
from ferry.cli import main
from ferry.offload.executor import PassView
from ferry.profile import chrome_trace, format_report, predict_run, profile_generation, summarize
from ferry.profile.profiler import TimedPassView
from helpers import streaming_budget

PROMPT = "The capital of France"


def streaming_engine(folder, **options):
    """Every layer streams through two slots."""
    probe = ferry.load(folder, dtype="fp32", ctx=64, progress=False)
    budget = streaming_budget(probe.model, resident=0, depth=2, ctx=64)
    probe.close()
    engine = ferry.load(folder, dtype="fp32", ctx=64, progress=False, gpu_memory=budget, **options)
    assert len(engine.plan.streamed_layers) == engine.model.num_layers
    return engine


def profiled(engine, n: int = 10):
    run = profile_generation(engine, PROMPT, max_new_tokens=n, ignore_eos=True)
    return run, summarize(engine, run, predict_run(engine, run))


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return min(a[1], b[1]) - max(a[0], b[0]) > 0


@pytest.fixture(scope="module")
def sirius_run(tiny_model_dir):
    """Sirius, period 4, every layer streaming over a 2 GB/s emulated link, 12 tokens."""
    engine = streaming_engine(tiny_model_dir(), sparsity=0.5, period=4, emulate_link_gbps=2.0)
    engine.generate(PROMPT, max_new_tokens=2)  # loads the row-gather kernel (once per process, outside passes)
    run, r = profiled(engine, n=12)
    engine.close()
    return engine, run, r


def test_report_agrees_with_the_generation(sirius_run):
    engine, run, r = sirius_run
    stats = run.generation.stats
    assert r["new_tokens"] == stats.new_tokens == len(run.token_s) == 12
    assert r["phases"]["prefill"]["count"] == 1
    assert r["phases"]["full_pass"]["count"] == stats.full_passes >= 1
    assert r["phases"]["sparse_step"]["count"] == stats.sparse_steps >= 1
    in_passes = sum(p["total_s"] for p in r["phases"].values())
    assert 0.3 * r["total_s"] < in_passes <= r["total_s"]
    assert r["select_s"] == stats.select_s > 0  # Griffin selected after the prefill
    assert r["other_s"] >= 0 and in_passes + r["select_s"] + r["other_s"] == pytest.approx(r["total_s"])
    assert "selection" in format_report(r)
    for p in run.passes:  # layers sit inside their pass; every layer appears once per pass
        assert [x["layer"] for x in p["layers"]] == list(range(engine.model.num_layers))
        assert p["wait_s"] + p["compute_s"] <= p["dur_s"] + 1e-6
        assert all(x["wait_s"] >= 0 and x["compute_s"] >= 0 for x in p["layers"])
    assert [row["layer"] for row in r["per_layer"]] == list(range(engine.model.num_layers))
    assert all({"prefill", "sparse_step", "full_pass"} <= set(row) for row in r["per_layer"])
    assert r["link"]["bytes"] == stats.h2d_bytes > 0
    assert r["link"]["bytes_per_token"] == pytest.approx(stats.h2d_bytes / 12)
    assert r["aal"] == stats.aal and r["mode"] == "sirius"
    assert 0 < r["ttft_s"] <= r["total_s"]
    lat = r["token_latency_s"]
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["memory"]["device_peak_bytes"] is None  # CPU: no measured device figure
    assert r["memory"]["device_plan_bytes"] == engine.plan.device_bytes
    assert r["memory"]["rss_peak_bytes"] > 0
    json.dumps(r)  # one JSON object


def test_prediction_uses_the_runs_counts(sirius_run):
    engine, run, r = sirius_run
    p, stats = r["predicted"], run.generation.stats
    assert p["link_gbps"] == 2.0 and p["link_source"].startswith("emulated")
    assert p["mem_gbps"] > 0
    by_counts = (stats.sparse_steps * p["sparse_step_s"] + stats.full_passes * p["full_pass_s"]) / 11
    assert p["s_per_token"] == pytest.approx(by_counts)
    assert p["measured_s_per_token"] == pytest.approx(stats.decode_s / 11)
    assert p["ratio"] == pytest.approx(p["measured_s_per_token"] / p["s_per_token"])
    # A full pass moves every layer over the 2 GB/s link: it cannot be predicted faster than that.
    assert p["full_pass_s"] >= engine.plan.link_bytes["full_pass"] / 2e9


def test_in_order_trace_counts_every_byte(tiny_model_dir):
    engine = streaming_engine(tiny_model_dir(), sparsity=0.5, period=4)
    run, r = profiled(engine)
    assert sum(c["bytes"] for c in run.copies) == r["link"]["bytes"] == run.generation.stats.h2d_bytes
    kinds = {c["kind"] for c in run.copies}
    assert kinds == {"layer", "prefix"}  # full passes move whole layers, sparse steps prefixes


@pytest.mark.parametrize("schedule", ["pipelined", "serial"])
def test_trace_tracks_and_overlap(schedule, tiny_model_dir, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    budget = str(streaming_budget(ferry.load(tiny_model_dir(), dtype="fp32", ctx=64, progress=False).model,
                                  resident=0, depth=2, ctx=64))
    code = main(["profile", "-m", str(tiny_model_dir()), "-p", PROMPT, "-n", "6", "--ignore-eos",
                 "--dtype", "fp32", "--ctx", "64", "--gpu-memory", budget, "--emulate-link", "0.05",
                 "--schedule", schedule, "--trace", str(trace), "--json"])
    assert code == 0
    json.loads(capsys.readouterr().out)
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {1: "compute", 2: "copy (host to device)", 3: "tokens"}
    for e in events:
        if e["ph"] == "X":
            assert e["dur"] >= 0 and isinstance(e["ts"], float) and e["pid"] == 1
    copies = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["ph"] == "X" and e["tid"] == 2)
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "compute"]
    assert len(copies) >= 6 * 4 and len(compute) == 6 * 4  # prefill + 5 steps, 4 layers each
    assert all(b[0] >= a[1] for a, b in zip(copies, copies[1:]))  # one copy at a time
    assert {e["name"] for e in events if e.get("cat") == "pass"} == {"prefill", "full pass"}
    overlapped = sum(overlaps(c, k) for c in copies for k in compute)
    if schedule == "pipelined":
        assert overlapped > 0
    else:
        assert overlapped == 0


def test_trace_nests_layers_in_passes(tiny_model_dir):
    engine = ferry.load(tiny_model_dir(), dtype="fp32", ctx=64, progress=False)
    run, _ = profiled(engine, n=4)
    events = chrome_trace(run)["traceEvents"]
    passes = [e for e in events if e.get("cat") == "pass"]
    layers = [e for e in events if e.get("cat") == "layer"]
    assert len(layers) == len(passes) * engine.model.num_layers
    for e in layers:
        assert any(p["ts"] <= e["ts"] and e["ts"] + e["dur"] <= p["ts"] + p["dur"] for p in passes)
    assert not [e for e in events if e["ph"] == "X" and e["tid"] == 2]  # nothing streams, nothing moves


def spy_on_views(monkeypatch, module) -> list:
    """Record the `views` each generation started from `module` hands to `generate`."""
    seen, real = [], module.generate

    def spy(rt, request, views=None):
        seen.append(views)
        return real(rt, request, views)

    monkeypatch.setattr(module, "generate", spy)
    return seen


def test_profiling_off_adds_nothing(tiny_model_dir, monkeypatch):
    """A plain generation runs on the runtime's own PassViews (no views are passed); only a
    profiled one gets timed views, and nothing stays attached afterwards."""
    engine = streaming_engine(tiny_model_dir(), sparsity=0.5, emulate_link_gbps=5.0)
    rt = engine.runtime
    plain = spy_on_views(monkeypatch, ferry.engine.engine)  # what Engine.stream passes
    profiled_views = spy_on_views(monkeypatch, ferry.profile.profiler)
    engine.generate(PROMPT, max_new_tokens=4)
    profiled(engine, n=4)
    first = engine.generate(PROMPT, max_new_tokens=4)
    assert plain == [None, None]
    assert [type(v.layers) for v in profiled_views[0]] == [TimedPassView, TimedPassView]
    assert [type(w.layers) for w in (rt.weights, rt.sparse_weights)] == [PassView, PassView]
    assert rt.link.stop_trace() == []  # the profiler stopped its copy trace
    assert first.stats.h2d_bytes > 0
    engine.close()


def test_human_report(tiny_model_dir, capsys):
    code = main(["profile", "-m", str(tiny_model_dir()), "-p", PROMPT, "-n", "5", "--sparsity", "0.5",
                 "--period", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("prefill", "sparse step", "full pass", "TTFT", "p50", "AAL", "predicted", "RSS peak"):
        assert text in out, text


def test_format_report_without_tokens(tiny_model_dir):
    engine = ferry.load(tiny_model_dir(), dtype="fp32", ctx=64, progress=False)
    run, r = profiled(engine, n=1)
    assert r["token_latency_s"] is None and r["predicted"] is None
    assert "TTFT" in format_report(r)


@pytest.mark.parametrize("flags, message", [
    (["--warmup", "-1"], "warmup"),
    (["--gpu", "gtx480"], "gpu"),
    (["-n", "-2"], "max-new-tokens"),
    (["--emulate-link", "0"], "emulate-link"),
])
def test_bad_profile_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["profile", "-p", "hi", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--trace", "/no/such/folder/trace.json"], "no such folder"),
    (["--gpu", "rtx4090", "--device", "cpu"], "--gpu"),
])
def test_profile_errors_exit_2(flags, message, tiny_model_dir, capsys):
    code = main(["profile", "-m", str(tiny_model_dir()), "-p", "hi", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("card,preset", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"),
                                         ("NVIDIA H200", "h200"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
                                         ("NVIDIA A100-SXM4-80GB", "a100-80g"), ("Tesla T4", None)])
def test_card_names_pick_the_most_specific_preset(card, preset):
    from ferry.profile.summary import preset_for

    assert preset_for(card) == preset

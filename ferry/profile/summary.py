"""The summary of a profiled generation: what `ferry profile --json` prints, and the cost
model's prediction for the same run beside the measurement.

Phase totals add up to the wall time (speculative steps are reported as their own phase, not
inside the full pass that hosted them); per-layer means are kept per phase; the prediction uses
the run's plan, its measured (or emulated) link speed and a memory bandwidth from a card preset
or measured.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

import numpy as np
import torch

from ferry.engine.config import DTYPES
from ferry.engine.engine import Engine
from ferry.offload.costmodel import GPUS, Gpu, predict_for_plan
from ferry.offload.transfer import make_clock
from ferry.profile.profiler import PHASES, Run


def summarize(engine: Engine, run: Run, prediction: dict | None = None) -> dict:
    """The report `ferry profile --json` prints (one JSON object)."""
    rt, s = engine.runtime, run.generation.stats
    tokens = run.token_s
    gaps = np.diff(tokens) if len(tokens) > 1 else np.array([])
    phases = _phases(run.passes)
    in_passes = sum(v["total_s"] for v in phases.values())
    return {
        "model": str(rt.folder),
        "device": rt.device.type, "dtype": _dtype_name(rt.dtype),
        "mode": s.mode, "schedule": engine.config.offload.schedule, "link_kind": _link_name(engine),
        "layers": engine.model.num_layers, "streamed_layers": len(engine.plan.streamed_layers),
        "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens, "finish_reason": s.finish_reason,
        "total_s": run.total_s,
        "ttft_s": tokens[0] if tokens else None,
        "tokens_per_s": s.tokens_per_s,
        "end_to_end_tokens_per_s": len(tokens) / run.total_s if run.total_s > 0 else 0.0,
        "token_latency_s": _percentiles(gaps),
        "phases": phases,
        "select_s": s.select_s,  # Griffin's neuron selection after the prefill (reorders, prefix copies)
        "other_s": run.total_s - in_passes - s.select_s,  # tokenizing, sampling, acceptance, Python
        "per_layer": _per_layer(engine.plan, engine.model.num_layers, run.passes),
        "link": {"bytes": s.h2d_bytes, "copies": len(run.copies), "gbps": s.h2d_gbps,
                 "overlap": s.overlap, "bytes_per_token": s.h2d_bytes_per_token},
        "aal": s.aal, "corrected_fraction": s.corrected_fraction,
        "effective_density": s.effective_density,
        "sparse_steps": s.sparse_steps, "full_passes": s.full_passes,
        "memory": {"device_plan_bytes": engine.plan.device_bytes, "device_peak_bytes": run.device_peak,
                   "rss_peak_bytes": run.rss_peak, "rss_max_bytes": _max_rss()},
        "predicted": prediction,
        "passes": [{k: v for k, v in p.items() if k != "layers"} for p in run.passes],
        "generation": asdict(s),
    }


def _phases(passes: list[dict]) -> dict:
    out = {}
    for name in PHASES:
        durs = [p["dur_s"] for p in passes if p["phase"] == name]
        if not durs:
            continue
        mine = [p for p in passes if p["phase"] == name]
        out[name] = {"count": len(durs), "total_s": sum(durs), "mean_s": sum(durs) / len(durs),
                     "max_s": max(durs), "wait_s": sum(p["wait_s"] for p in mine),
                     "compute_s": sum(p["compute_s"] for p in mine)}
    return out


def _per_layer(plan, n_layers: int, passes: list[dict]) -> list[dict]:
    """Mean wait and compute per layer index, per phase."""
    sums: dict[tuple[int, str], list[float]] = {}
    for p in passes:
        for x in p["layers"]:
            acc = sums.setdefault((x["layer"], p["phase"]), [0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += x["wait_s"]
            acc[2] += x["compute_s"]
    rows = []
    for layer in range(n_layers):
        where = ("resident" if layer in plan.resident_layers else
                 "prefix resident" if layer in plan.prefix_layers else "streamed")
        row = {"layer": layer, "where": where}
        for phase in PHASES:
            if (layer, phase) in sums:
                n, wait, compute = sums[(layer, phase)]
                row[phase] = {"count": n, "wait_s": wait / n, "compute_s": compute / n}
        rows.append(row)
    return rows


def _percentiles(gaps: np.ndarray) -> dict | None:
    if not len(gaps):
        return None
    p50, p90, p99 = np.percentile(gaps, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(gaps.mean()),
            "max": float(gaps.max())}


def _max_rss() -> int | None:
    """The process's RSS high-water mark since it started (getrusage), loading included."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024  # macOS reports bytes


def _link_name(engine: Engine) -> str:
    emulated = engine.config.offload.emulate_link_gbps
    if engine.runtime.device.type == "cuda":
        return "cuda copy stream"
    if emulated:
        return f"emulated {emulated:g} GB/s"
    return "in-order (CPU)"


# --- the cost model's prediction for the measured run ---------------------------------------------

def preset_for(card: str) -> str | None:
    """The preset a card's name ("NVIDIA H100 PCIe") matches: the most specific one whose every
    part the name holds ("h100-pcie" before "h100"), or None."""
    name = card.lower().replace(" ", "")
    return next((key for key in sorted(GPUS, key=lambda k: -len(k.split("-")))
                 if all(part in name for part in key.split("-"))), None)


def bandwidths(engine: Engine, stats, gpu: str | None) -> tuple[float | None, str, float, str]:
    """(link GB/s, where from, memory GB/s, where from) for the prediction."""
    device, emulated = engine.runtime.device, engine.config.offload.emulate_link_gbps
    if emulated:
        link, link_src = emulated, "emulated (--emulate-link)"
    elif stats.h2d_bytes > 0:
        link, link_src = stats.h2d_gbps, "measured (this run's copies)"
    else:
        link, link_src = None, "nothing crossed the link"
    if gpu is None and device.type == "cuda":
        gpu = preset_for(torch.cuda.get_device_name(device))
    if gpu is not None:
        return link, link_src, GPUS[gpu].memory_gbps, f"preset {gpu}"
    # a GPU's copy well past its L2 cache (50-60 MB on H100/H200)
    return link, link_src, copy_gbps(device, (512 if device.type == "cuda" else 64) << 20), f"measured {device.type} copy"


def predict_run(engine: Engine, run: Run, gpu: str | None = None) -> dict | None:
    """The cost model's s/token for this run: its plan's bytes, the link and memory bandwidths,
    the run's mean chunk length as the period and its measured AAL; next to the measured s/token."""
    s = run.generation.stats
    after_first = s.new_tokens - 1
    if after_first < 1:
        return None
    link, link_src, mem, mem_src = bandwidths(engine, s, gpu)
    card = Gpu("measured run", memory_gbps=mem, link_gbps=link or 1e9)  # nothing streams: no link term
    schedule = engine.config.offload.schedule
    plain = predict_for_plan(engine.plan, card, period=1, aal=1.0, schedule=schedule)
    full, sparse = plain["dense"].s_per_token, plain["sparse"].s_per_token
    period = aal = None
    if s.mode == "sirius" and s.full_passes:
        period, aal = 1 + s.sparse_steps / s.full_passes, s.aal
        per_token = predict_for_plan(engine.plan, card, period=period, aal=aal, schedule=schedule)["ferry"].s_per_token
    else:
        per_token = sparse if s.mode == "sparse" else full
    measured = s.decode_s / after_first
    phases = _phases(run.passes)
    return {
        "s_per_token": per_token, "measured_s_per_token": measured,
        "ratio": measured / per_token if per_token > 0 else None,
        "full_pass_s": full, "measured_full_pass_s": phases.get("full_pass", {}).get("mean_s"),
        "sparse_step_s": sparse if s.mode != "dense" else None,
        "measured_sparse_step_s": phases.get("sparse_step", {}).get("mean_s"),
        "link_gbps": link, "link_source": link_src, "mem_gbps": mem, "mem_source": mem_src,
        "period": period, "aal": aal,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))


def copy_gbps(device: torch.device, nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Device memory bandwidth estimate, for predictions when no card preset applies: the best of a few buffer-to-buffer copies, bytes read
    plus bytes written per second (a benchmark: it waits for its own copies)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)  # both touched once so page faults stay out of the timing
    clock = make_clock(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock.mark()
        dst.copy_(src)
        t1 = clock.mark()
        best = min(best, clock.seconds(t1) - clock.seconds(t0))
    return 2 * nbytes / best / 1e9 if best > 0 else float("inf")

"""Where the time of one generation goes: per phase, per layer, on the link.

`profile_generation` runs one generation of an engine on timed views of its weights
(`TimedPassView`), handed to `ferry.engine.generation.generate` as its `views`: every forward
pass and every layer in it is marked with the compute-side clock of `ferry.offload.transfer`
(perf_counter on the CPU device; on a GPU, timing events recorded on the compute stream and read
once after the run, so nothing synchronizes per layer). The link records each copy on the same
timeline. A generation that is not profiled gets no views: it runs on the runtime's plain ones,
so nothing is marked and nothing extra is called.

Per layer, four marks: acquire starts (a), the weights are ready (b), release starts (c), release
returns (d). wait = (b - a) + (d - c): time compute spent blocked on this layer's copy, plus
issuing the next copies (on the in-order CPU link that is the copy itself); compute = c - b.
Token times are taken on the host as the caller receives each committed token, so they are the
latencies a user sees (Sirius commits tokens in bursts after each full pass).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import psutil
import torch

from ferry.engine.config import DTYPES
from ferry.engine.engine import Engine
from ferry.engine.generation import Generation, TokenStream, Views, generate
from ferry.engine.runtime import Runtime
from ferry.model.weights import Kind
from ferry.offload.costmodel import GPUS, Gpu, predict_for_plan
from ferry.offload.executor import PassView
from ferry.offload.transfer import copy_gbps, make_clock

PHASES = ("prefill", "sparse_step", "full_pass", "speculative_step")


@dataclass
class PassMarks:
    phase: str
    start: object  # clock marks: floats on the CPU, CUDA events on a GPU
    issued: object = None  # after begin (which issues the pass's first copies)
    end: object = None
    layers: list = field(default_factory=list)  # (layer, a, b, c, d)


class Recorder:
    """Marks of one generation, shared by its full and sparse views."""

    def __init__(self, device: torch.device):
        self.process = psutil.Process()
        self.host_t0 = time.perf_counter()
        self.clock = make_clock(device)
        self.passes: list[PassMarks] = []
        self.open_full: PassMarks | None = None  # a full pass in progress (speculation nests in it)
        self.rss_peak = self.process.memory_info().rss

    def sample_rss(self) -> None:
        self.rss_peak = max(self.rss_peak, self.process.memory_info().rss)


class TimedPassView(PassView):
    """A PassView that marks its pass and layers on the recorder's clock."""

    def __init__(self, executor, kind: Kind, rec: Recorder):
        super().__init__(executor, kind)
        self.rec, self.mark = rec, rec.clock.mark
        self._ready: tuple = ()

    def begin(self) -> None:
        start = self.mark()
        phase = "prefill" if not self.rec.passes else ("full_pass" if self.kind == Kind.FULL else "sparse_step")
        if self.kind == Kind.SPARSE and self.rec.open_full is not None:
            phase = "speculative_step"  # runs between the layers of a streaming full pass
        marks = self._marks = PassMarks(phase, start)
        if self.kind == Kind.FULL:
            self.rec.open_full = marks
        self.rec.passes.append(marks)
        super().begin()
        marks.issued = self.mark()

    def acquire(self, index: int):
        a = self.mark()
        weights = super().acquire(index)
        self._ready = (a, self.mark())
        return weights

    def release(self, index: int) -> None:
        c = self.mark()
        super().release(index)
        self._marks.layers.append((index, *self._ready, c, self.mark()))

    def end(self) -> None:
        self._marks.end = self.mark()
        if self.rec.open_full is self._marks:
            self.rec.open_full = None
        self.rec.sample_rss()


def timed_views(rt: Runtime, rec: Recorder) -> Views:
    """The runtime's full and sparse weights, their layers seen through timed pass views."""
    return (replace(rt.weights, layers=TimedPassView(rt.executor, Kind.FULL, rec)),
            replace(rt.sparse_weights, layers=TimedPassView(rt.executor, Kind.SPARSE, rec)))


@dataclass
class Run:
    """One profiled generation, marks resolved to seconds since the profiler started."""

    generation: Generation
    total_s: float
    token_s: list[float]  # when each committed token reached the caller
    passes: list[dict]
    copies: list[dict]
    rss_peak: int
    device_peak: int | None


def profile_generation(engine: Engine, prompt: str, **options) -> Run:
    """Generate once on timed views; options as for `Engine.stream`."""
    rt = engine.runtime
    request = engine.request(prompt, **options)
    rt.executor.drain()  # no copy of an earlier generation is still in flight
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    rec = Recorder(rt.device)
    rt.link.start_trace()
    token_times: list[float] = []
    try:
        stream = TokenStream(generate(rt, request, views=timed_views(rt, rec)))
        for token in stream:
            if token.id is not None:  # None: only text the detokenizer held back
                token_times.append(time.perf_counter())
        total = time.perf_counter() - rec.host_t0
    finally:
        spans = rt.link.stop_trace()
    rec.sample_rss()
    seconds = rec.clock.seconds
    return Run(
        generation=stream.result, total_s=total, token_s=[t - rec.host_t0 for t in token_times],
        passes=_net_of_speculation([_resolve_pass(p, seconds) for p in rec.passes if p.end is not None]),
        copies=[_resolve_copy(s, seconds, rt.plan) for s in spans],
        rss_peak=rec.rss_peak,
        device_peak=torch.cuda.max_memory_allocated(rt.device) if cuda else None)


def _resolve_pass(p: PassMarks, seconds) -> dict:
    layers = []
    for layer, a, b, c, d in p.layers:
        a, b, c, d = seconds(a), seconds(b), seconds(c), seconds(d)
        layers.append(dict(layer=layer, start_s=a, ready_s=b, done_s=c, end_s=d,
                           wait_s=(b - a) + (d - c), compute_s=c - b))
    start, issued, end = seconds(p.start), seconds(p.issued), seconds(p.end)
    return dict(phase=p.phase, start_s=start, dur_s=end - start,
                wait_s=(issued - start) + sum(x["wait_s"] for x in layers),
                compute_s=sum(x["compute_s"] for x in layers), layers=layers)


def _net_of_speculation(passes: list[dict]) -> list[dict]:
    """A full pass's duration without the speculative steps that ran inside it (they are
    reported as their own phase), so phase totals add up to the wall time."""
    spec = [p for p in passes if p["phase"] == "speculative_step"]
    for p in passes:
        if p["phase"] == "full_pass":
            inside = [q["dur_s"] for q in spec if p["start_s"] <= q["start_s"] <= p["start_s"] + p["dur_s"]]
            p["speculative_s"] = sum(inside)
            p["dur_s"] -= p["speculative_s"]
    return passes


def _resolve_copy(span: tuple, seconds, plan) -> dict:
    layer, nbytes, start, end = span
    if layer is None:
        kind = "upload"
    elif nbytes == plan.layer_bytes:
        kind = "layer"
    else:
        kind = "complement" if layer in plan.prefix_layers else "prefix"
    return dict(layer=layer, kind=kind, bytes=nbytes, start_s=seconds(start), end_s=seconds(end))


# --- the summary ---------------------------------------------------------------------------------

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
        "other_s": run.total_s - in_passes,  # sampling, acceptance, neuron selection, Python
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
        name = torch.cuda.get_device_name(device).lower().replace(" ", "")
        gpu = next((key for key in GPUS if all(part in name for part in key.split("-"))), None)
    if gpu is not None:
        return link, link_src, GPUS[gpu].memory_gbps, f"preset {gpu}"
    return link, link_src, copy_gbps(device), f"measured {device.type} copy"


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

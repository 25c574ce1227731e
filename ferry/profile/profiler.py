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

import time
from dataclasses import dataclass, field, replace

import psutil
import torch

from ferry.engine.engine import Engine
from ferry.engine.generation import Generation, TokenStream, Views, generate
from ferry.engine.runtime import Runtime
from ferry.model.weights import Kind
from ferry.offload.executor import PassView
from ferry.offload.transfer import make_clock

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
    """Generate once on timed views, from a cold prefill (warm-up runs of the same prompt leave
    nothing to reuse); options as for `Engine.stream`."""
    rt = engine.runtime
    request = engine.request(prompt, **options)
    engine.reset()
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

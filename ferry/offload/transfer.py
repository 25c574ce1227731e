"""Everything about moving bytes host -> device: pinning, copy streams, events, the CPU fallback.

No other module touches streams or events (hence the profiler's clocks and CUDA graph capture
live here too; host buffers are pinned in `ferry.offload.pinned`). A `Link` (the protocol the executor is written against) copies a host tensor into a device
buffer asynchronously and returns a ticket compute waits on; it counts bytes, busy time and
compute's stalls, so overlap can be reported. Three implementations:

- `CudaLink`: one copy stream; per-copy events order compute after copies and slot reuse after
  compute. Nothing calls a device-wide synchronize.
- `InOrderLink`, `EmulatedLink` (`ferry.offload.cpu_links`): the CPU device's stand-ins, with
  no stream or event in them.

For profiling, a link records each copy's (tag, bytes, start, end) after `start_trace`, and the
clocks below time compute on the same timeline (perf_counter on CPU, CUDA events on a GPU).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

def synchronize(device: torch.device) -> None:
    """Wait for the compute queued on the device (a CUDA call returns before its kernels run),
    not for the copy stream's prefetches: before reading a clock that should include it."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclass
class LinkStats:
    bytes: int = 0  # of the copies issued (a generation's bytes are the copies it asked for)
    copies: int = 0
    busy_s: float = 0.0  # time the link spent copying
    stall_s: float = 0.0  # time compute waited for copies
    done_bytes: int | None = None  # of the copies finished, when some may still be in flight

    @property
    def gbps(self) -> float:
        done = self.bytes if self.done_bytes is None else self.done_bytes
        return done / self.busy_s / 1e9 if self.busy_s > 0 else 0.0

    @property
    def overlap(self) -> float:
        """Fraction of transfer time hidden behind compute."""
        if self.busy_s <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.stall_s / self.busy_s))

    def minus(self, earlier: "LinkStats") -> "LinkStats":
        done = None if self.done_bytes is None else self.done_bytes - (earlier.done_bytes or 0)
        return LinkStats(self.bytes - earlier.bytes, self.copies - earlier.copies,
                         self.busy_s - earlier.busy_s, self.stall_s - earlier.stall_s, done)


Ticket = Any  # what `copy` returns and `wait` takes: None, a threading.Event or a CUDA event
Marker = Any  # what `compute_done` returns and `copy(after=)` takes: None or a CUDA event


class Link(Protocol):
    """Host -> device copies as the executor sees them, whichever link carries them."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Marker = None, tag: Any = None) -> Ticket:
        """Copy src into dst once the compute marked by `after` is done (tag: its trace name)."""
        ...

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A small copy on the compute side, not queued behind the prefetches (counted)."""
        ...

    def wait(self, ticket: Ticket) -> None:
        """Make compute wait for the copy (on a GPU the host does not block)."""
        ...

    def finish(self, ticket: Ticket) -> None:
        """Block the host until the copy is done (before its source is rewritten)."""
        ...

    def compute_done(self) -> Marker:
        """A marker for the compute queued so far: a later copy `after` it may overwrite its inputs."""
        ...

    def stats(self, wait: bool = True) -> LinkStats:
        """Totals so far; wait=False leaves out the timings of copies still in flight (on a GPU,
        waiting for them would stall a pass that prefetches)."""
        ...

    def close(self) -> None: ...

    def start_trace(self) -> None: ...

    def stop_trace(self) -> list[tuple]: ...


class Traced:
    """The optional copy trace every link keeps: (tag, bytes, start mark, end mark) per copy.
    Marks are perf_counter floats (CPU links) or CUDA events (CudaLink); a clock reads both."""

    _spans: list | None = None
    _lock: threading.Lock

    def start_trace(self) -> None:
        with self._lock:
            self._spans = []

    def stop_trace(self) -> list[tuple]:
        """The copies recorded since start_trace (in issue order); recording stops."""
        with self._lock:
            spans, self._spans = self._spans or [], None
        return spans


class CudaLink(Traced):
    """A dedicated copy stream. Copies wait for the compute event guarding their slot; compute
    waits for the copy's event. Timing uses events, read only when stats are asked for."""

    def __init__(self, device: torch.device):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaLink needs CUDA")
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._stats = LinkStats()
        self._lock = threading.Lock()
        self._copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _event(self) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None = None, tag=None):
        start, end = self._event(), self._event()
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        nbytes = src.numel() * src.element_size()
        self._stats.bytes += nbytes
        self._stats.copies += 1
        self._copy_events.append((start, end))
        if self._spans is not None:
            self._spans.append((tag, nbytes, start, end))
        if len(self._copy_events) > 1024:
            self._fold(finished_only=True)
        return end

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A small copy on the compute stream, not queued behind the prefetches on the copy
        stream (an embedding row for a step that runs while a pass streams)."""
        dst.copy_(src)
        self._stats.bytes += src.numel() * src.element_size()
        self._stats.copies += 1

    def wait(self, ticket: torch.cuda.Event | None) -> None:
        if ticket is None:
            return
        compute = torch.cuda.current_stream(self.device)
        before, after = self._event(), self._event()
        before.record(compute)
        compute.wait_event(ticket)
        after.record(compute)
        self._stall_events.append((before, after))
        if len(self._stall_events) > 1024:
            self._fold(finished_only=True)

    def finish(self, ticket: torch.cuda.Event | None) -> None:
        """Block the host until the copy is done (before its source buffer is rewritten)."""
        if ticket is not None:
            ticket.synchronize()

    def compute_done(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _fold(self, finished_only: bool) -> None:
        """Move timed event pairs into the totals; without finished_only, waits for them."""
        for pairs, field in ((self._copy_events, "busy_s"), (self._stall_events, "stall_s")):
            keep = []
            for first, last in pairs:
                if finished_only and not last.query():
                    keep.append((first, last))
                    continue
                last.synchronize()
                setattr(self._stats, field, getattr(self._stats, field) + first.elapsed_time(last) / 1e3)
            pairs[:] = keep

    def stats(self, wait: bool = True) -> LinkStats:
        """Totals so far. wait: the timings of every copy issued (blocks for those in flight:
        call outside hot loops); else only of those finished (bytes count every copy issued)."""
        self._fold(finished_only=not wait)
        return LinkStats(**vars(self._stats))

    def close(self) -> None:
        """Wait for the copies in flight (prefetches for a next pass): their host and device
        buffers may be freed once the engine is gone."""
        self.stream.synchronize()


class HostClock:
    """Compute-side timestamps on the CPU device: perf_counter, the clock the CPU links use."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, mark: float) -> float:
        """A mark (this clock's or a CPU link's) as seconds since the clock started."""
        return mark - self.t0


class CudaClock:
    """Compute-side timestamps on a GPU: timing events recorded on the compute stream, read only
    in `seconds` (after the run), so marking never blocks the host. CudaLink's copy events are
    on the same device timeline."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = self.mark()

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, mark: torch.cuda.Event) -> float:
        mark.synchronize()  # this event only; a no-op once the run is over
        return self.base.elapsed_time(mark) / 1e3


def make_clock(device: torch.device) -> HostClock | CudaClock:
    return CudaClock(device) if device.type == "cuda" else HostClock()


def capture_graph(fn: Callable[[], Any], pool: Any = None) -> tuple[Callable[[], None], Any]:
    """fn as a CUDA graph in memory pool `pool`: (replay, fn's output, rewritten by each replay).
    Warm-ups run first on a side stream (capture requires it; Triton compiles there, not in it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):  # a server's other threads
        out = fn()
    return graph.replay, out

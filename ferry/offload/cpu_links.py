"""The CPU device's links: plain copies, in order or throttled to an emulated link speed.

- `InOrderLink`: the copy happens when issued (nothing to overlap).
- `EmulatedLink`: a background thread performs copies throttled to a set GB/s, so overlap can
  be measured and tested without a GPU.

Both satisfy `ferry.offload.transfer.Link`; neither touches CUDA.

A copy that fails in `EmulatedLink`'s worker must not leave compute waiting forever: the worker
records the error on the copy's ticket and sets it, `wait`/`finish` raise it as a RuntimeError
naming the copy, and every later or queued copy fails at once (the link is broken for good, as a
real link would be after a failed transfer: the slot contents can no longer be trusted).
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from ferry.offload.transfer import LinkStats, Traced


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a contiguous CPU tensor as a numpy array (no copy)."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


class InOrderLink(Traced):
    """CPU fallback: each copy runs when issued, in order; compute never waits afterwards."""

    def __init__(self) -> None:
        self._stats = LinkStats()
        self._lock = threading.Lock()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None, tag=None) -> None:
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        nbytes = src.numel() * src.element_size()
        self._stats.bytes += nbytes
        self._stats.copies += 1
        self._stats.busy_s += t1 - t0
        self._stats.stall_s += t1 - t0  # the compute thread did the copy itself
        if self._spans is not None:
            self._spans.append((tag, nbytes, t0, t1))
        return None

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copy(dst, src)

    def wait(self, ticket) -> None:
        pass

    def finish(self, ticket) -> None:
        pass

    def compute_done(self):
        return None

    def stats(self, wait: bool = True) -> LinkStats:
        return LinkStats(**vars(self._stats))

    def close(self) -> None:
        pass


class CopyTicket(threading.Event):
    """What `EmulatedLink.copy` returns: set when the copy is done or has failed (then `error`)."""

    def __init__(self, tag, nbytes: int) -> None:
        super().__init__()
        self.tag, self.nbytes = tag, nbytes
        self.error: BaseException | None = None

    def describe(self) -> str:
        return f"copy of {self.nbytes} bytes (tag {self.tag!r})"

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.set()


class EmulatedLink(Traced):
    """CPU stand-in for PCIe: a worker thread copies in order at `gbps` GB/s at most."""

    CHUNK = 1 << 22  # bytes per throttled piece
    POLL_S = 0.5  # how often a waiting compute thread checks that the worker is still alive

    def __init__(self, gbps: float):
        if not gbps > 0:
            raise ValueError(f"link bandwidth must be > 0 GB/s, got {gbps}")
        self.rate = gbps * 1e9
        self._stats = LinkStats(done_bytes=0)
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._broken: BaseException | None = None  # the first failed copy's error
        self._worker = threading.Thread(target=self._run, name="ferry-emulated-link", daemon=True)
        self._worker.start()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None, tag=None) -> CopyTicket:
        done = CopyTicket(tag, src.numel() * src.element_size())
        if self._broken is not None:  # fail fast: nothing after a failed copy can be trusted
            raise RuntimeError(f"emulated link is broken by an earlier failed copy "
                               f"({self._broken!r}); refusing the {done.describe()}") from self._broken
        with self._lock:  # counted when issued, as the other links do: a generation's bytes are
            self._stats.bytes += done.nbytes  # the copies it asked for
            self._stats.copies += 1
        # The worker copies raw bytes with numpy: a torch op from a second thread would start a
        # second OpenMP team whose spinning threads slow the compute thread down for good.
        self._jobs.put((_bytes_of(dst), _bytes_of(src), done))
        return done

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A small copy done by the compute thread at once, not queued behind the prefetches
        (an embedding row for a step that runs while a pass streams)."""
        dst.copy_(src)
        with self._lock:
            self._stats.bytes += src.numel() * src.element_size()
            self._stats.copies += 1

    def wait(self, ticket: CopyTicket | None) -> None:
        """Block until the copy is done; raise if it failed or the worker is gone."""
        if ticket is None:
            return
        if not ticket.is_set():
            t0 = time.perf_counter()
            while not ticket.wait(self.POLL_S):
                if not self._worker.is_alive():  # stopped without setting it: closed, or killed
                    ticket.fail(self._broken or RuntimeError("the emulated link's worker stopped"))
            with self._lock:
                self._stats.stall_s += time.perf_counter() - t0
        if ticket.error is not None:
            raise RuntimeError(f"emulated link: {ticket.describe()} failed: {ticket.error!r}") from ticket.error

    def finish(self, ticket: CopyTicket | None) -> None:
        """Block the calling thread until the copy is done (raises as `wait`)."""
        self.wait(ticket)

    def compute_done(self):
        return None  # copies are issued from the compute thread after the compute they follow

    def _run(self) -> None:
        """Copy jobs in order; after a failure, fail every queued job instead of copying it."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            dst, src, done = job
            if self._broken is not None:
                done.fail(self._broken)
                continue
            try:
                self._copy(dst, src, done.tag)
            except BaseException as err:  # noqa: BLE001 -- handed to the compute side, not lost
                self._broken = err
                done.fail(err)
            else:
                done.set()

    def _copy(self, dst: np.ndarray, src: np.ndarray, tag) -> None:
        """One copy, in pieces, each no earlier than the set bandwidth would deliver it."""
        if dst.size != src.size:
            raise ValueError(f"destination holds {dst.size} bytes, source {src.size}")
        t0 = time.perf_counter()
        for lo in range(0, src.size, self.CHUNK):
            hi = min(lo + self.CHUNK, src.size)
            np.copyto(dst[lo:hi], src[lo:hi])
            delay = t0 + hi / self.rate - time.perf_counter()  # when this piece would arrive
            if delay > 0:
                time.sleep(delay)
        t1 = time.perf_counter()
        with self._lock:
            self._stats.busy_s += t1 - t0
            self._stats.done_bytes += src.size
            if self._spans is not None:
                self._spans.append((tag, src.size, t0, t1))

    def stats(self, wait: bool = True) -> LinkStats:  # its copies are timed as they finish
        with self._lock:
            return LinkStats(**vars(self._stats))

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=5)

"""The CPU device's links: plain copies, in order or throttled to an emulated link speed.

- `InOrderLink`: the copy happens when issued (nothing to overlap).
- `EmulatedLink`: a background thread performs copies throttled to a set GB/s, so overlap can
  be measured and tested without a GPU.

Both satisfy `ferry.offload.transfer.Link`; neither touches CUDA.
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

    def stats(self) -> LinkStats:
        return LinkStats(**vars(self._stats))

    def close(self) -> None:
        pass


class EmulatedLink(Traced):
    """CPU stand-in for PCIe: a worker thread copies in order at `gbps` GB/s at most."""

    CHUNK = 1 << 22  # bytes per throttled piece

    def __init__(self, gbps: float):
        if not gbps > 0:
            raise ValueError(f"link bandwidth must be > 0 GB/s, got {gbps}")
        self.rate = gbps * 1e9
        self._stats = LinkStats(done_bytes=0)
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="ferry-emulated-link", daemon=True)
        self._worker.start()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None, tag=None) -> threading.Event:
        done = threading.Event()
        with self._lock:  # counted when issued, as the other links do: a generation's bytes are
            self._stats.bytes += src.numel() * src.element_size()  # the copies it asked for
            self._stats.copies += 1
        # The worker copies raw bytes with numpy: a torch op from a second thread would start a
        # second OpenMP team whose spinning threads slow the compute thread down for good.
        self._jobs.put((_bytes_of(dst), _bytes_of(src), done, tag))
        return done

    def copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A small copy done by the compute thread at once, not queued behind the prefetches
        (an embedding row for a step that runs while a pass streams)."""
        dst.copy_(src)
        with self._lock:
            self._stats.bytes += src.numel() * src.element_size()
            self._stats.copies += 1

    def wait(self, ticket: threading.Event | None) -> None:
        if ticket is None or ticket.is_set():
            return
        t0 = time.perf_counter()
        ticket.wait()
        with self._lock:
            self._stats.stall_s += time.perf_counter() - t0

    def finish(self, ticket: threading.Event | None) -> None:
        """Block the calling thread until the copy is done."""
        self.wait(ticket)

    def compute_done(self):
        return None  # copies are issued from the compute thread after the compute they follow

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            dst, src, done, tag = job
            t0 = time.perf_counter()
            for lo in range(0, src.size, self.CHUNK):
                hi = min(lo + self.CHUNK, src.size)
                np.copyto(dst[lo:hi], src[lo:hi])
                # Sleep until this piece would have arrived over a link of the set bandwidth.
                delay = t0 + hi / self.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            t1 = time.perf_counter()
            with self._lock:
                self._stats.busy_s += t1 - t0
                self._stats.done_bytes += src.size
                if self._spans is not None:
                    self._spans.append((tag, src.size, t0, t1))
            done.set()

    def stats(self) -> LinkStats:
        with self._lock:
            return LinkStats(**vars(self._stats))

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=5)

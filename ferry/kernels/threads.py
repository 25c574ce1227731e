"""Parallel numba kernels beside torch: one thread budget, and no second spinning team.

Why this module exists. torch runs its intra-op work on the OpenMP runtime it ships
(`torch/lib/libgomp.so.1`). numba's default threading layer picks `omp` when TBB is absent, and
numba's OpenMP pool links the *system* libgomp: a second OpenMP runtime in the process (both
show in /proc/self/maps), with its own team. After every parallel region a libgomp team spins
(GOMP_SPINCOUNT, about 300k iterations) before it sleeps, so after a numba kernel its team spins
on the cores torch's team needs next, and the reverse; on a machine where another process
already takes a core, the teams' members are descheduled at their barriers and a token can
take many times longer.

So, unless the user chose a layer (NUMBA_THREADING_LAYER), numba's `workqueue` layer is selected
before the first parallel launch: its workers sleep on a condition variable between kernels,
never spin, and load no OpenMP runtime. That layer aborts the process when two threads launch
at once, so `run_parallel` serializes launches with a lock (two kernels would only fight for
the same cores anyway; the emulated link's worker copies with numpy, not numba).

Every parallel kernel call goes through `run_parallel`, which runs it on torch's thread count
(one budget for both) and leaves torch's count as it was. Work below `SERIAL_BYTES` runs on one
thread: a launch and a barrier cost more than a few KB of copying, and under contention a
barrier can wait a whole scheduler slice for a descheduled worker.

`fitted_threads` is the same lesson for torch's own team: a 2-thread team on 2 cores where
another process keeps one busy waits at every parallel region (about 250 per token on the
default model, counted with an LD_PRELOAD shim on GOMP_parallel) for the member the scheduler
parked, and decoding collapses (measured on a 2-core machine at a load average near 7: 0.80
tok/s with 2 threads, 4.64 inside `fitted_threads`); transformers' generate collapses the same
way (0.73 tok/s). Running on the cores nobody else is
using avoids it. It has to be entered around a generation by the caller.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import numba
import torch

if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "workqueue"

SERIAL_BYTES = 256 << 10  # below this much array data a kernel runs on one thread
_launch = threading.Lock()  # one parallel launch at a time (see the module notes)


def _array_bytes(args) -> int:
    return sum(getattr(a, "nbytes", 0) for a in args)


def run_parallel(kernel, *args) -> None:
    """Run a parallel numba kernel on torch's thread count (one thread for tiny work)."""
    threads = torch.get_num_threads()
    wanted = 1 if _array_bytes(args) < SERIAL_BYTES else threads
    with _launch:
        numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))
        kernel(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def thread_settings() -> dict:
    """The thread knobs in effect, for benchmarks and reports."""
    try:
        layer = numba.threading_layer()  # raises before the first parallel launch
    except ValueError:
        layer = f"{numba.config.THREADING_LAYER} (not launched yet)"
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "numba_threads": numba.get_num_threads(), "numba_layer": layer,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _own_running_threads() -> int:
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:  # the thread ended meanwhile
            continue
    return count


def busy_elsewhere(samples: int = 5) -> int:
    """Runnable threads of other processes now: /proc/loadavg's running count less this process's
    own, the smallest of a few samples a millisecond apart (one sample is noisy). 0 without /proc."""
    try:
        counts = []
        for i in range(samples):
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
            counts.append(max(0, running - _own_running_threads()))
            if i + 1 < samples:
                time.sleep(0.001)
        return min(counts)
    except (OSError, ValueError, IndexError):
        return 0


def fit_threads(limit: int | None = None) -> int:
    """Threads for torch's team: at most `limit` (torch's setting), at most the cores others leave."""
    limit = limit or torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(limit, cores - busy_elsewhere()))


_scopes = {"open": 0, "baseline": 0}  # fitted_threads bodies running, torch's setting outside them
_scope_lock = threading.Lock()


@contextmanager
def fitted_threads():
    """Run the body on the cores free now (see the module notes); torch's setting comes back when
    the last open body ends. Bodies may overlap and end in any order (generators suspended
    between tokens): each fits from the setting outside all of them, never from another's fit."""
    with _scope_lock:
        if _scopes["open"] == 0:
            _scopes["baseline"] = torch.get_num_threads()
        _scopes["open"] += 1
        n = fit_threads(_scopes["baseline"])
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    try:
        yield n
    finally:
        with _scope_lock:
            _scopes["open"] -= 1
            if _scopes["open"] == 0 and torch.get_num_threads() != _scopes["baseline"]:
                torch.set_num_threads(_scopes["baseline"])

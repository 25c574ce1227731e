"""Runtime faults and resource accounting: a failing link worker, thread settings, host buffers.

Why these exist: a copy that fails in the emulated link's worker thread used to leave compute
waiting forever; parallel kernels must not fight torch's threads; the host store must cost the
bytes the plan says (no power-of-two rounding) and the plan must say how much of it is pinned.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import ferry

from ferry.offload import cpu_links
from ferry.offload.cpu_links import EmulatedLink


def _copy_with_timeout(fn, timeout: float = 5.0):
    """Run fn in a thread; return (exception or None, seconds). Fails the test on a hang."""
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001
            box["err"] = err

    t0 = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the waiting side hung"
    return box.get("err"), time.perf_counter() - t0


def test_worker_error_reaches_wait_promptly_and_later_copies_fail_fast(monkeypatch):
    link = EmulatedLink(gbps=100.0)
    real = np.copyto

    def broken(dst, src, *a, **k):
        raise OSError("injected copy failure")

    monkeypatch.setattr(cpu_links.np, "copyto", broken)
    src, dst = torch.ones(1000), torch.zeros(1000)
    first = link.copy(dst, src, tag=7)
    queued = link.copy(dst, src, tag=8)
    err, seconds = _copy_with_timeout(lambda: link.wait(first))
    assert isinstance(err, RuntimeError) and "tag 7" in str(err) and "injected" in str(err)
    assert isinstance(err.__cause__, OSError) and seconds < 2.0
    err, _ = _copy_with_timeout(lambda: link.finish(queued))  # queued behind it: failed, not copied
    assert isinstance(err, RuntimeError) and "tag 8" in str(err)
    monkeypatch.setattr(cpu_links.np, "copyto", real)
    with pytest.raises(RuntimeError, match="broken"):
        link.copy(dst, src, tag=9)
    link.close()


def test_mismatched_buffer_fails_the_copy_not_the_process():
    link = EmulatedLink(gbps=100.0)
    ticket = link.copy(torch.zeros(10), torch.ones(1000), tag="short")
    err, _ = _copy_with_timeout(lambda: link.wait(ticket))
    assert isinstance(err, RuntimeError) and "'short'" in str(err)
    link.close()


def test_wait_on_a_closed_worker_raises_instead_of_hanging(monkeypatch):
    link = EmulatedLink(gbps=100.0)
    monkeypatch.setattr(EmulatedLink, "POLL_S", 0.01)
    link.close()  # the worker is gone; a ticket it never saw can never be set
    ticket = cpu_links.CopyTicket("orphan", 4)
    err, seconds = _copy_with_timeout(lambda: link.wait(ticket))
    assert isinstance(err, RuntimeError) and seconds < 2.0


def test_good_copies_still_work_after_the_change():
    link = EmulatedLink(gbps=100.0)
    src, dst = torch.arange(5000, dtype=torch.float32), torch.zeros(5000)
    link.finish(link.copy(dst, src, tag=0))
    assert torch.equal(dst, src) and link.stats().done_bytes == 20000
    link.close()


# --- exact pinned bytes -------------------------------------------------------------------

class FakeCudart:
    """Stands in for torch.cuda.cudart(): records what would be page-locked."""

    def __init__(self, error: int = 0):
        self.error, self.registered, self.unregistered = error, [], []

    def cudaHostRegister(self, ptr, size, flags):
        self.registered.append((ptr, size))
        return self.error

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    from ferry.offload import pinned

    fake = FakeCudart()
    monkeypatch.setattr(pinned, "_cudart", lambda: fake)
    monkeypatch.setattr(pinned.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinned, "_pin_warned", False)
    return fake


def test_pinned_host_buffer_locks_exactly_its_bytes_and_unlocks_when_freed(fake_cuda):
    import gc

    from ferry.offload.pinned import host_empty

    numel = 3 * (1 << 20) + 7  # just past a power of two: the caching allocator would take 8 MiB
    flat = host_empty(numel, torch.bfloat16, pin=True)
    assert flat.numel() == numel and flat.dtype == torch.bfloat16
    assert fake_cuda.registered == [(flat.data_ptr(), numel * 2)]
    flat[-1] = 1.5  # writable to the last element
    view = flat[10:20]
    del flat
    gc.collect()
    assert fake_cuda.unregistered == []  # a view still holds the buffer
    del view
    gc.collect()
    assert fake_cuda.unregistered == [fake_cuda.registered[0][0]]


def test_refused_pinning_falls_back_to_pageable_with_one_warning(fake_cuda):
    from ferry.offload.pinned import host_empty

    fake_cuda.error = 2  # cudaErrorMemoryAllocation
    with pytest.warns(UserWarning, match="pinning host memory failed"):
        flat = host_empty(1000, torch.float32, pin=True)
    assert flat.numel() == 1000
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        host_empty(1000, torch.float32, pin=True)  # once only


def test_unpinned_host_buffer_registers_nothing(fake_cuda):
    from ferry.offload.pinned import host_empty

    assert host_empty(1000, torch.float16, pin=False).numel() == 1000
    assert fake_cuda.registered == []


def test_plan_reports_pinned_bytes_on_cuda_only():
    from pathlib import Path

    from ferry.model.config import ModelConfig
    from ferry.offload.planner import make_plan
    from ferry.offload.sources import resolve_config

    cfg = ModelConfig.from_hf(resolve_config(str(Path(__file__).parent / "data" / "llama-3.1-70b-config.json")))
    common = dict(dtype_bytes=2, budget_bytes=24 << 30, host_available_bytes=1 << 40, ctx=4096)
    gpu, cpu = make_plan(cfg, device="cuda", **common), make_plan(cfg, device="cpu", **common)
    assert gpu.streamed_layers and gpu.pinned_bytes == len(gpu.streamed_layers) * gpu.layer_bytes
    assert gpu.to_dict()["pinned_bytes"] == gpu.pinned_bytes
    assert cpu.pinned_bytes == 0 and cpu.to_dict()["pinned_bytes"] == 0


# --- threads ------------------------------------------------------------------------------

def test_numba_uses_no_second_openmp_runtime():
    import numba

    from ferry.kernels.gather import gather_rows

    src = torch.randn(4000, 64)
    out = torch.empty(3000, 64)
    gather_rows(src, torch.arange(3000), out)  # large enough to run on the pool
    assert torch.equal(out, src[:3000])
    assert numba.threading_layer() == "workqueue"


def test_tiny_parallel_work_runs_on_one_thread_and_torch_keeps_its_count(monkeypatch):
    from ferry.kernels import threads

    seen = []
    kernel = lambda *args: seen.append(threads.numba.get_num_threads())  # noqa: E731
    before = torch.get_num_threads()
    threads.run_parallel(kernel, np.zeros(16), np.zeros(16))
    assert seen == [1] and torch.get_num_threads() == before


def test_fitted_threads_leave_busy_cores_alone_and_restore(monkeypatch):
    from ferry.kernels import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "busy_elsewhere", lambda samples=5: 3)
    assert threads.fit_threads(4) == 1
    monkeypatch.setattr(threads, "busy_elsewhere", lambda samples=5: 9)
    assert threads.fit_threads(4) == 1  # never below one
    monkeypatch.setattr(threads, "busy_elsewhere", lambda samples=5: 0)
    assert threads.fit_threads(2) == 2  # never above the setting
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "fit_threads", lambda limit=None: 1)
    with threads.fitted_threads() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_busy_elsewhere_reads_a_sane_count():
    from ferry.kernels.threads import busy_elsewhere

    assert 0 <= busy_elsewhere(samples=2) < 10_000


def test_parallel_kernels_from_two_threads_do_not_abort():
    from ferry.kernels.gather import gather_rows

    src = torch.randn(4000, 64)
    outs = [torch.empty(3000, 64) for _ in range(2)]

    def work(out):
        for _ in range(20):
            gather_rows(src, torch.arange(3000), out)

    threads = [threading.Thread(target=work, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(torch.equal(o, src[:3000]) for o in outs)


def test_concurrent_cats_writers_leave_one_whole_file(tmp_path):
    """Two processes calibrating the same weights write the same header-keyed file (the last
    rename wins): a reader must see one writer's whole table, never a torn or mixed one, and
    no partial file may stay behind."""
    import json

    from ferry.offload import cache_files

    path = tmp_path / "cats" / "0123456789abcdef.json"
    path.parent.mkdir()
    tables = [json.dumps({"format": "cats", "quantiles": [[i + 0.5] * 257] * 30}) for i in range(3)]
    stop, bad = threading.Event(), []

    def read():
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            if text not in tables:
                bad.append(text[:60])

    def write(text):
        for _ in range(15):
            assert cache_files.write_text_or_warn(path, text, "the CATS thresholds")

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(t,)) for t in tables]
    reader.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    reader.join(10)
    assert not bad, bad[:3]
    assert path.read_text() in tables
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_generation_runs_on_the_free_cores_and_gives_the_count_back(tiny_model_dir, monkeypatch):
    """threads auto: a generation (and a batch) runs with torch's team fitted to the cores other
    processes leave free, and torch's setting comes back afterwards; threads N sets N at load."""
    from ferry.kernels import threads

    engine = ferry.load(tiny_model_dir("llama3"), dtype="fp32", ctx=64, progress=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(before + 1)))
    monkeypatch.setattr(threads, "busy_elsewhere", lambda samples=5: before)  # one core left
    seen = []
    stream = engine.stream("The capital of France", max_new_tokens=3, ignore_eos=True)
    for _ in stream:
        seen.append(torch.get_num_threads())
    assert len(seen) >= 3 and set(seen) == {1} and torch.get_num_threads() == before
    seen.clear()
    from ferry.engine import batch

    step = batch.BatchRun.step
    monkeypatch.setattr(batch.BatchRun, "step", lambda run: (seen.append(torch.get_num_threads()), step(run))[1])
    engine.generate_batch(["a b", "c d"], max_new_tokens=2, ignore_eos=True)
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
    try:
        fixed = ferry.load(tiny_model_dir("llama3"), dtype="fp32", ctx=64, progress=False, threads=1)
        assert torch.get_num_threads() == 1
        fixed.generate("a b", max_new_tokens=2)
        assert torch.get_num_threads() == 1  # a fixed count is not fitted
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ferry.FerryError, match="threads"):
        ferry.load(tiny_model_dir("llama3"), threads=0)


def test_overlapping_fitted_scopes_fit_from_the_setting_and_restore_it(monkeypatch):
    """Two streams open at once, closed in either order: each fits from torch's own setting (not
    from the other's fit), and the setting comes back when the last one ends."""
    from ferry.kernels import threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(before + 2)))
    busy = {"n": before + 1}  # one core left
    monkeypatch.setattr(threads, "busy_elsewhere", lambda samples=5: busy["n"])
    first = threads.fitted_threads()
    assert first.__enter__() == 1
    busy["n"] = 0  # the load went away: the second scope gets the whole setting back
    second = threads.fitted_threads()
    assert second.__enter__() == before
    first.__exit__(None, None, None)  # the first ends before the second
    second.__exit__(None, None, None)
    assert torch.get_num_threads() == before

"""Cache faults: a cache is never silently wrong and never the reason a run fails.

Scrambled, stale, unwritable, concurrently written and interrupted caches of quantized layers and
CATS thresholds (GGUF conversions: test_faults_gguf.py).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ferry
from ferry.model.quant import QuantConfig, QuantLayout
from ferry.offload import cache_files, quant_store
from ferry.offload.checkpoint import open_checkpoint
from ferry.sparse.calibrate import calibration_file

PROMPT = "The capital of France"
COMMON = dict(dtype="fp32", ctx=64, progress=False)


pytestmark = pytest.mark.usefixtures("cache_dir")


def logits(engine) -> torch.Tensor:
    return engine.logits(engine.encode(PROMPT, chat=False))


def quant_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "quant").iterdir()) if (cache_dir / "quant").exists() else []


def fresh_quantized_logits(folder, monkeypatch, tmp_path, **options) -> torch.Tensor:
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "elsewhere"))
    want = logits(ferry.load(folder, **COMMON, quant="int4", **options))
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    return want


# --- the quantized cache ----------------------------------------------------------------------
def test_scrambled_quant_cache_warns_and_is_rebuilt(tiny_model_dir, cache_dir, monkeypatch, tmp_path):
    folder = tiny_model_dir("llama3")
    want = fresh_quantized_logits(folder, monkeypatch, tmp_path)
    ferry.load(folder, **COMMON, quant="int4")
    [path] = quant_files(cache_dir)
    data = bytearray(path.read_bytes())
    data[1000:1064] = bytes(reversed(data[1000:1064]))  # same size, wrong bytes
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        engine = ferry.load(folder, **COMMON, quant="int4")
    torch.testing.assert_close(logits(engine), want, atol=0, rtol=0)
    assert quant_files(cache_dir) == [path] and path.read_bytes() != bytes(data)  # rebuilt in place
    torch.testing.assert_close(logits(ferry.load(folder, **COMMON, quant="int4")), want, atol=0, rtol=0)


def test_quant_cache_of_another_version_is_not_used_and_is_removed(tiny_model_dir, cache_dir, monkeypatch):
    folder = tiny_model_dir("llama3")
    ferry.load(folder, **COMMON, quant="int8")
    [path] = quant_files(cache_dir)
    monkeypatch.setattr(cache_files, "ferry_version", lambda: "99.0")
    calls = []
    real = quant_store.pack_quant_layer
    monkeypatch.setattr(quant_store, "pack_quant_layer", lambda *a: (calls.append(1), real(*a))[1])
    ferry.load(folder, **COMMON, quant="int8")
    assert len(calls) == 4 and len(quant_files(cache_dir)) == 1 and path not in quant_files(cache_dir)
    ferry.load(folder, **COMMON, quant="int4")  # another setting of the same model: both stay
    assert len(quant_files(cache_dir)) == 2


def test_caches_of_a_deleted_model_are_removed_by_the_next_write(tiny_model_dir, cache_dir, tmp_path):
    gone = Path(shutil.copytree(tiny_model_dir("llama3"), tmp_path / "deleted-model"))
    options = dict(**COMMON, quant="int4", sparsity=0.5, mode="sparse", sparse_method="cats")
    ferry.load(gone, **options)
    shutil.rmtree(gone)
    ferry.load(tiny_model_dir("qwen2"), **options)
    assert [p.name for p in quant_files(cache_dir)] == [p.name for p in quant_files(cache_dir) if "qwen2" in p.name]
    assert len(quant_files(cache_dir)) == 1 and len(list((cache_dir / "cats").iterdir())) == 1


class FullDisk:
    """A file whose writes fail as on a full disk after `ok` of them."""

    def __init__(self, f, ok: int):
        self.f, self.ok = f, ok

    def write(self, data):
        if self.ok <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.ok -= 1
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_while_writing_the_quant_cache_warns_and_runs(tiny_model_dir, cache_dir, monkeypatch, tmp_path):
    folder = tiny_model_dir("llama3")
    want = fresh_quantized_logits(folder, monkeypatch, tmp_path)
    real = cache_files.create_partial

    def full(target, mode="wb"):
        f, tmp = real(target, mode)
        return FullDisk(f, ok=2), tmp

    monkeypatch.setattr(cache_files, "create_partial", full)
    with pytest.warns(UserWarning, match="No space left"):
        engine = ferry.load(folder, **COMMON, quant="int4")
    torch.testing.assert_close(logits(engine), want, atol=0, rtol=0)
    assert quant_files(cache_dir) == []  # the partial file is gone


def test_keyboard_interrupt_while_quantizing_leaves_no_partial_file(tiny_model_dir, cache_dir, monkeypatch):
    calls = []
    real = quant_store.pack_quant_layer

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(quant_store, "pack_quant_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ferry.load(tiny_model_dir("llama3"), **COMMON, quant="int4")
    assert quant_files(cache_dir) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partials_of_dead_processes_are_removed(tiny_model_dir, cache_dir):
    (cache_dir / "quant").mkdir(parents=True)
    dead = cache_dir / "quant" / f"model.bin.partial-{dead_pid()}-abc123"
    dead.write_bytes(b"half")
    dead_dir = cache_dir / "quant" / f"folder.partial-{dead_pid()}-xyz"
    dead_dir.mkdir()
    (dead_dir / "shard").write_bytes(b"x")
    alive = cache_dir / "quant" / f"model.bin.partial-{os.getppid()}-def456"  # a live writer's file
    alive.write_bytes(b"busy")
    ferry.load(tiny_model_dir("llama3"), **COMMON, quant="int8")
    assert not dead.exists() and not dead_dir.exists() and alive.exists()


def test_second_writer_keeps_the_first_writers_file(tmp_path):
    target = tmp_path / "c.bin"
    seen = cache_files.stat_key(target)
    f, tmp = cache_files.create_partial(target)
    with f:
        f.write(b"second")
        cache_files.fsync_file(f)
    target.write_bytes(b"first")  # another process finished meanwhile
    assert not cache_files.commit_file(tmp, target, seen)
    assert target.read_bytes() == b"first" and sorted(tmp_path.iterdir()) == [target]


def test_partial_files_are_exclusive_and_never_follow_a_planted_symlink(tmp_path):
    target = tmp_path / "c.bin"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / f"{target.name}.partial-{os.getpid()}").symlink_to(victim)  # the old predictable name
    f1, p1 = cache_files.create_partial(target)
    f2, p2 = cache_files.create_partial(target)
    with f1, f2:
        f1.write(b"one"), f2.write(b"two")
    assert p1 != p2 and not p1.is_symlink() and not p2.is_symlink()
    assert victim.read_bytes() == b"keep"


# --- cache keys -------------------------------------------------------------------------------
def test_cache_keys_follow_group_size_fitting_mtime_and_version(tiny_model_dir, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(tiny_model_dir("llama3"), tmp_path / "model"))
    q = QuantLayout.for_config(open_checkpoint(folder).config, QuantConfig("int4"))

    def keys():
        checkpoint = open_checkpoint(folder)
        quant = [quant_store.cache_file(checkpoint, layout, fit)
                 for layout, fit in ((q, True), (dataclasses.replace(q, group=64), True), (q, False))]
        return (*quant, calibration_file(folder, torch.float32, "int4"))

    before = keys()
    assert len(set(before[:3])) == 3  # group size, fitting
    shard = folder / "model.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after_touch = keys()
    assert all(a != b for a, b in zip(before, after_touch))  # shard mtime, also for CATS
    monkeypatch.setattr(cache_files, "ferry_version", lambda: "99.0")
    assert all(a != b for a, b in zip(after_touch, keys()))  # ferry's version


# --- CATS thresholds --------------------------------------------------------------------------
def test_read_only_cache_for_cats_warns_and_uses_the_thresholds(tiny_model_dir, cache_dir, monkeypatch, tmp_path):
    folder = tiny_model_dir("llama3")
    options = dict(**COMMON, sparsity=0.5, mode="sparse", sparse_method="cats")
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "writable"))
    want = ferry.load(folder, **options).generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
    monkeypatch.setenv("FERRY_CACHE_DIR", str(cache_dir))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_files, "create_partial", read_only)
    with pytest.warns(UserWarning, match="CATS thresholds"):
        engine = ferry.load(folder, **options)
    assert engine.runtime.executor.store.thresholds is not None
    assert engine.generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids == want


def test_stale_cats_cache_is_recomputed(tiny_model_dir, cache_dir):
    folder = tiny_model_dir("llama3")
    options = dict(**COMMON, sparsity=0.5, mode="sparse", sparse_method="cats")
    ferry.load(folder, **options)
    [path] = list((cache_dir / "cats").iterdir())
    stored = json.loads(path.read_text())
    stored["ferry"] = "0.0.1"
    path.write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="recalibrating"):
        ferry.load(folder, **options)
    assert json.loads(path.read_text())["ferry"] == cache_files.ferry_version()


def test_cats_cache_follows_the_quantized_weights(tiny_model_dir, cache_dir):
    folder = tiny_model_dir("llama3")
    options = dict(**COMMON, sparsity=0.5, mode="sparse", sparse_method="cats", quant="int4")
    ferry.load(folder, **options)
    ferry.load(folder, **options, quant_fit=False)
    assert len(list((cache_dir / "cats").iterdir())) == 2

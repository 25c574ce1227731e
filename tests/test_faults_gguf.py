"""GGUF faults: conversions cached safely (concurrent, read-only, stale), and GGUF files ferry must
refuse clearly (unknown tensors, truncation) or read correctly (Llama 3.1's rope_freqs)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ferry
from ferry.errors import FerryError
from ferry.offload import cache_files, gguf as gguf_mod
from ferry.offload.checkpoint import load_hf_config
from helpers import llama_cpp_rope_freqs, write_gguf

from test_faults_cache import COMMON, PROMPT

pytestmark = pytest.mark.usefixtures("cache_dir")


# --- GGUF conversion --------------------------------------------------------------------------
@pytest.fixture
def llama31_gguf(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """(a Llama-3.1-style GGUF carrying rope_freqs, the checkpoint it was made from)."""
    folder = tiny_model_dir("llama3")
    freqs = llama_cpp_rope_freqs(json.loads((folder / "config.json").read_text()))
    assert 1 < freqs.max() and freqs.min() == 1  # the tiny model's rope is really scaled
    return write_gguf(folder, tmp_path / "tiny-llama31.gguf", {"rope_freqs.weight": freqs}), folder


def test_rope_freqs_becomes_the_llama3_rope_of_the_converted_config(llama31_gguf, cache_dir):
    from ferry.model.config import ModelConfig
    from ferry.model.rope import rope_inv_freq

    path, folder = llama31_gguf
    out = gguf_mod.convert_gguf(path, cache_dir)
    got = ModelConfig.from_hf(load_hf_config(out))
    want = ModelConfig.from_hf(load_hf_config(folder))
    assert got.rope.kind == "llama3"
    torch.testing.assert_close(rope_inv_freq(got.rope, 16), rope_inv_freq(want.rope, 16), rtol=1e-5, atol=0)
    converted, original = ferry.load(out, **COMMON), ferry.load(folder, **COMMON)
    ids = original.encode(PROMPT, chat=False)
    torch.testing.assert_close(converted.logits(ids), original.logits(ids), rtol=1e-4, atol=1e-4)


def test_rope_freqs_fit_recovers_llama_3_1_parameters():
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "rope_parameters": dict(
        rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)}
    params = gguf_mod.rope_parameters_from_factors(llama_cpp_rope_freqs(cfg).astype(np.float64),
                                                   500000.0, 128, "x.gguf")
    assert params == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
    assert gguf_mod.rope_parameters_from_factors(np.ones(64), 500000.0, 128, "x.gguf") is None
    with pytest.raises(FerryError, match="x.gguf.*llama3"):
        gguf_mod.rope_parameters_from_factors(np.linspace(1, 3, 64), 500000.0, 128, "x.gguf")


def test_unknown_gguf_tensor_is_one_clear_error(tiny_model_dir, tmp_path, cache_dir):
    path = write_gguf(tiny_model_dir("llama3"), tmp_path / "odd.gguf",
                      {"blk.0.attn_mystery.weight": np.zeros(8, dtype=np.float32)})
    with pytest.raises(FerryError, match=r"odd\.gguf.*unknown GGUF tensor 'blk\.0\.attn_mystery\.weight'"):
        gguf_mod.convert_gguf(path, cache_dir)
    assert list((cache_dir / "gguf").iterdir()) == []  # nothing half-written left


def test_truncated_gguf_is_one_clear_error(tiny_model_dir, tmp_path, cache_dir):
    path = write_gguf(tiny_model_dir("llama3"), tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(FerryError, match=r"cut\.gguf.*(truncated|not a readable)"):
        gguf_mod.convert_gguf(path, cache_dir)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(FerryError, match=r"garbage\.gguf"):
        gguf_mod.convert_gguf(garbage, cache_dir)


def test_second_converter_uses_the_folder_the_first_finished(llama31_gguf, cache_dir, monkeypatch):
    path, _ = llama31_gguf
    real = gguf_mod._convert
    first: list[Path] = []

    def racing(src, tmp, head):  # another process finishes the same conversion while we work
        real(src, tmp, head)
        shutil.copytree(tmp, first[0])

    key_probe = gguf_mod.convert_gguf(path, cache_dir)  # learn the target's name
    first.append(key_probe)
    shutil.rmtree(key_probe)
    monkeypatch.setattr(gguf_mod, "_convert", racing)
    assert gguf_mod.convert_gguf(path, cache_dir) == key_probe
    assert [p.name for p in (cache_dir / "gguf").iterdir()] == [key_probe.name]  # our partial is gone
    monkeypatch.setattr(gguf_mod, "_convert", None)  # a complete folder is used without converting
    assert gguf_mod.convert_gguf(path, cache_dir) == key_probe


def test_read_only_gguf_cache_converts_into_a_temporary_folder(llama31_gguf, cache_dir, monkeypatch):
    path, _ = llama31_gguf

    def read_only(target):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_files, "make_partial_dir", read_only)
    with pytest.warns(UserWarning, match="temporary folder"):
        out = gguf_mod.convert_gguf(path, cache_dir)
    assert cache_dir not in out.parents and (out / "model.safetensors.index.json").is_file()


def test_gguf_cache_key_follows_mtime_and_version(llama31_gguf, cache_dir, monkeypatch):
    path, _ = llama31_gguf
    out = gguf_mod.convert_gguf(path, cache_dir)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = gguf_mod.convert_gguf(path, cache_dir)
    assert not out.exists()  # a conversion of an older state of the file is removed
    monkeypatch.setattr(cache_files, "ferry_version", lambda: "99.0")
    again = gguf_mod.convert_gguf(path, cache_dir)
    assert len({out, touched, again}) == 3 and not touched.exists()
    assert [p for p in (cache_dir / "gguf").iterdir()] == [again]

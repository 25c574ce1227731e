"""Lazy, validated access to a Hugging Face safetensors folder (single file or sharded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ferry.errors import FerryError
from ferry.model.config import ModelConfig, SUPPORTED_ARCHITECTURES

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    hf_config: Any  # transformers PretrainedConfig, read-only
    config: ModelConfig
    shard_of: dict[str, Path]  # tensor name -> the file holding it


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read config.json and locate every tensor; no tensor data is read yet."""
    hf_config = load_hf_config(folder)
    return Checkpoint(folder, hf_config, ModelConfig.from_hf(hf_config), _locate_tensors(folder))


def load_hf_config(folder: Path) -> Any:
    """The transformers config, after checking the architecture so the error names it."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise FerryError(f"{folder} has no config.json; is it a Hugging Face model folder?") from None
    except json.JSONDecodeError as err:
        raise FerryError(f"{folder / 'config.json'} is not valid JSON ({err})") from None
    return config_from_dict(raw, str(folder / "config.json"))


def config_from_dict(raw: dict, source: str) -> Any:
    """A transformers config from config.json contents, after checking the architecture."""
    arch = raw.get("model_type") if isinstance(raw, dict) else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FerryError(
            f"unsupported architecture {arch!r} in {source}; ferry runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2 families)"
        )
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k != "model_type"}
    return AutoConfig.for_model(arch, **fields)


def _locate_tensors(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
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

    def get(self, name: str) -> torch.Tensor:
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

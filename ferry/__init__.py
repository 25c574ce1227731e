"""ferry: run 70B-class language models on one consumer GPU.

Weights stream from host memory on demand, contextual sparsity moves only the MLP rows predicted
active, and a periodic full-weight pass corrects the sparse tokens.

The public names load on first use (torch and transformers take seconds to import), so the
command line answers `--help` and Ctrl-C at once.
"""

from __future__ import annotations

import importlib
from typing import Any

from ferry.errors import FerryError, SettingError

_ENGINE = ("Engine", "FerryConfig", "Generation", "GenerationStats", "Request", "Runtime", "Token",
           "TokenStream", "build_runtime", "generate", "load")
__all__ = [*_ENGINE, "FerryError", "SettingError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        value = getattr(importlib.import_module("ferry.engine"), name)
        globals()[name] = value  # once loaded, a plain module attribute
        return value
    raise AttributeError(f"module 'ferry' has no attribute {name!r}")

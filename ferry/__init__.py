"""ferry: run 70B-class language models on one consumer GPU.

Weights stream from host memory on demand, contextual sparsity moves only the MLP rows predicted
active, and a periodic full-weight pass corrects the sparse tokens.
"""

from ferry.engine import (Engine, FerryConfig, Generation, GenerationStats, Request, Runtime, Token,
                          TokenStream, build_runtime, generate, load)
from ferry.errors import FerryError, SettingError

__all__ = ["Engine", "FerryConfig", "FerryError", "Generation", "GenerationStats", "Request", "Runtime",
           "SettingError", "Token", "TokenStream", "build_runtime", "generate", "load"]
__version__ = "0.1.0"

"""ferry: run 70B-class language models on one consumer GPU.

Weights stream from host memory on demand, contextual sparsity moves only the MLP rows predicted
active, and a periodic full-weight pass corrects the sparse tokens.
"""

from ferry.engine import Engine, Generation, GenerationStats, Token, TokenStream, load
from ferry.errors import FerryError

__all__ = ["Engine", "FerryError", "Generation", "GenerationStats", "Token", "TokenStream", "load"]
__version__ = "0.1.0"

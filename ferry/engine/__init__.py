"""The engine floor: configuration, the loaded runtime, the generation loop, and the Engine API."""

from ferry.engine.config import FerryConfig
from ferry.engine.engine import Engine, load
from ferry.engine.generation import Generation, GenerationStats, Request, Token, TokenStream, generate
from ferry.engine.runtime import Runtime, build_runtime

__all__ = ["Engine", "FerryConfig", "Generation", "GenerationStats", "Request", "Runtime", "Token",
           "TokenStream", "build_runtime", "generate", "load"]

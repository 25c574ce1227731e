"""The Python API: `ferry.load()` returns an Engine that generates from prompts.

The engine loads the checkpoint once; each generation reuses the KV cache and rope tables,
growing them only when a request needs more context than any before it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from ferry.errors import FerryError
from ferry.kernels.reference import rope_tables
from ferry.model.forward import Rope
from ferry.offload.checkpoint import open_checkpoint
from ferry.offload.loader import load_weights
from ferry.offload.sources import resolve_model
from ferry.scheduler.decode import DecodeTimes, decode_dense
from ferry.scheduler.kv_cache import KVCache
from ferry.scheduler.sampling import Sampler, SamplingConfig
from ferry.text import Detokenizer, encode_prompt

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class RuntimeConfig:
    dtype: str = "auto"  # auto, bf16, fp16, fp32
    device: str = "auto"  # auto, cpu, cuda
    ctx: int | None = None  # KV cache length; None: prompt + max new tokens of each request

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise FerryError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise FerryError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise FerryError(f"--device {self.device}: CUDA is not available on this machine")
        if self.ctx is not None and self.ctx < 1:
            raise FerryError(f"context length must be at least 1, got {self.ctx}")


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float  # decode steps per second (the first token comes from prefill)
    finish_reason: str  # stop (a stop token), length (max new tokens) or context (cache full)


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    token_ids: list[int]  # new tokens only, the stop token included when one ended the text
    stats: GenerationStats

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # the text this token adds (may be empty while a character is incomplete)


class TokenStream:
    """Iterator over the tokens of one generation; `.result` is set once it is exhausted."""

    def __init__(self, tokens: Iterator[Token]):
        self._tokens = tokens
        self.result: Generation | None = None

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
        return next(self._tokens)


class Engine:
    def __init__(self, model: str | os.PathLike | None = None, *, runtime: RuntimeConfig, progress: bool = True):
        self.runtime = runtime
        self.folder = resolve_model(model)
        self.checkpoint = open_checkpoint(self.folder)
        self.config = self.checkpoint.config
        self.device = torch.device(_pick_device(runtime.device))
        self.dtype = _pick_dtype(runtime.dtype, self.checkpoint.hf_config, self.device)
        self.tokenizer = _load_tokenizer(self.folder)
        self.stop_ids = _stop_ids(self.checkpoint.hf_config, self.tokenizer, self.folder)
        self.weights = load_weights(self.checkpoint, self.dtype, self.device, progress=progress)
        self.cache: KVCache | None = None
        self.rope: Rope | None = None

    def generate(self, prompt: str, **options) -> Generation:
        """Generate to completion; see `stream` for the options."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(
        self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
        top_p: float = 1.0, seed: int | None = None, chat: bool | None = None,
        ignore_eos: bool = False,
    ) -> TokenStream:
        """Tokens as they are produced; the finished Generation is on `.result` afterwards.

        ignore_eos keeps generating past stop tokens (for benchmarks that need fixed lengths).
        """
        if max_new_tokens < 0:
            raise FerryError(f"max new tokens must be >= 0, got {max_new_tokens}")
        sampler = Sampler(SamplingConfig(temperature=temperature, top_p=top_p, seed=seed))
        ids = encode_prompt(self.tokenizer, prompt, chat)
        self._prepare_context(len(ids), max_new_tokens)
        stream = TokenStream(iter(()))
        stop_ids = frozenset() if ignore_eos else self.stop_ids
        stream._tokens = self._run(stream, prompt, ids, max_new_tokens, sampler, stop_ids)
        return stream

    def _run(self, stream, prompt, ids, max_new_tokens, sampler, stop_ids) -> Iterator[Token]:
        times = DecodeTimes()
        detok = Detokenizer(self.tokenizer)
        prompt_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        new: list[int] = []
        tokens = decode_dense(
            self.config, self.weights, self.rope, self.cache, prompt_ids, max_new_tokens,
            sampler, stop_ids, times,
        )
        for token in tokens:
            new.append(token)
            yield Token(token, detok.push(token))
        tail = detok.flush()
        if tail:
            yield Token(-1, tail)
        rate = times.steps / times.decode_s if times.decode_s > 0 else 0.0
        stats = GenerationStats(len(ids), len(new), times.prefill_s, times.decode_s, rate, times.finish_reason)
        stream.result = Generation(prompt, detok.text, new, stats)

    def _prepare_context(self, prompt_len: int, max_new_tokens: int) -> None:
        """Size the KV cache and rope tables for this request (allocating only when they grow)."""
        limit = self.config.max_position_embeddings
        need = self.runtime.ctx or min(limit, prompt_len + max(max_new_tokens, 1))
        if prompt_len > need or prompt_len > limit:
            raise FerryError(
                f"the prompt has {prompt_len} tokens, more than the context of "
                f"{min(need, limit)} tokens"
            )
        if self.cache is None or self.cache.capacity < need:
            self.cache = KVCache(self.config, need, self.dtype, self.device)
            cos, sin = rope_tables(self.config.rope, self.config.head_dim, need, self.dtype, self.device)
            self.rope = Rope(cos, sin)


def load(model: str | os.PathLike | None = None, *, dtype: str = "auto", device: str = "auto",
         ctx: int | None = None, progress: bool = True) -> Engine:
    """Load a model (a folder, a .gguf file, a hub id, or None for the embedded default)."""
    return Engine(model, runtime=RuntimeConfig(dtype=dtype, device=device, ctx=ctx), progress=progress)


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _pick_dtype(dtype: str, hf_config, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's half precision on GPU; bf16 on CPU, where its GEMV is fastest."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda" and getattr(hf_config, "dtype", None) in (torch.float16, "float16"):
        return torch.float16
    return torch.bfloat16


def _load_tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FerryError(f"could not load the tokenizer from {folder}: {err}") from None


def _stop_ids(hf_config, tokenizer, folder) -> frozenset[int]:
    """Every id the checkpoint calls end-of-sequence (Llama 3 has several)."""
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(folder).eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return frozenset(ids)

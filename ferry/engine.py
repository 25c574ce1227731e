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
from ferry.offload.loader import LoadReport, load_model
from ferry.offload.planner import OffloadConfig, Plan, default_budgets, make_plan, parse_size
from ferry.offload.sources import resolve_model
from ferry.offload.transfer import CudaLink, EmulatedLink, InOrderLink
from ferry.scheduler.decode import DecodeTimes, decode_dense
from ferry.scheduler.kv_cache import KVCache
from ferry.scheduler.sampling import Sampler, SamplingConfig
from ferry.text import Detokenizer, encode_prompt

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_CTX = 4096  # context planned for when neither ctx nor a request says otherwise


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
    h2d_bytes: int  # bytes copied host -> device during this generation
    h2d_bytes_per_token: float  # per new token
    h2d_gbps: float  # achieved while the link was busy
    overlap: float  # fraction of transfer time hidden behind compute


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
    def __init__(
        self, model: str | os.PathLike | None = None, *, runtime: RuntimeConfig = RuntimeConfig(),
        offload: OffloadConfig = OffloadConfig(), progress: bool = True, tokenizer=None,
    ):
        self.runtime, self.offload = runtime, offload
        self.folder = resolve_model(model)
        self.checkpoint = open_checkpoint(self.folder)
        self.config = self.checkpoint.config
        self.device = torch.device(_pick_device(runtime.device))
        self.dtype = _pick_dtype(runtime.dtype, self.checkpoint.hf_config, self.device)
        self.tokenizer = tokenizer or load_tokenizer(self.folder)
        self.stop_ids = _stop_ids(self.checkpoint.hf_config, self.tokenizer, self.folder)
        self.plan: Plan = self._make_plan().check()
        self.link = _make_link(self.device, offload.link_gbps)
        self.weights, self.load_report = load_model(
            self.checkpoint, self.plan, self.dtype, self.device, self.link,
            pipelined=offload.schedule == "pipelined", progress=progress)
        self.cache: KVCache | None = None
        self.rope: Rope | None = None

    def _make_plan(self) -> Plan:
        budget, host = default_budgets(self.device.type, self.offload)
        ctx = self.runtime.ctx or min(self.config.max_position_embeddings, DEFAULT_CTX)
        return make_plan(
            self.config, dtype_bytes=torch.finfo(self.dtype).bits // 8, budget_bytes=budget,
            host_available_bytes=host, ctx=ctx, prefetch_depth=self.offload.prefetch_depth,
            device=self.device.type)

    def close(self) -> None:
        """Stop the link's worker (emulated link); the engine is unusable afterwards."""
        self.link.close()
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
        link_before = self.link.stats()
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
        link = self.link.stats().minus(link_before)
        stats = GenerationStats(
            len(ids), len(new), times.prefill_s, times.decode_s, rate, times.finish_reason,
            link.bytes, link.bytes / max(1, len(new)), link.gbps, link.overlap)
        stream.result = Generation(prompt, detok.text, new, stats)

    def _prepare_context(self, prompt_len: int, max_new_tokens: int) -> None:
        """Size the KV cache and rope tables for this request (allocating only when they grow)."""
        limit = self.plan.ctx  # what the memory plan reserved
        need = self.runtime.ctx or min(limit, prompt_len + max(max_new_tokens, 1))
        if prompt_len > limit:
            hint = "" if self.runtime.ctx else " (load with a larger ctx)"
            raise FerryError(
                f"the prompt has {prompt_len} tokens, more than the context of {limit} tokens{hint}")
        if self.cache is None or self.cache.capacity < need:
            self.cache = KVCache(self.config, need, self.dtype, self.device)
            cos, sin = rope_tables(self.config.rope, self.config.head_dim, need, self.dtype, self.device)
            self.rope = Rope(cos, sin)


def load(
    model: str | os.PathLike | None = None, *, dtype: str = "auto", device: str = "auto",
    ctx: int | None = None, gpu_memory: int | str | None = None, prefetch_depth: int = 2,
    link_gbps: float | None = None, schedule: str = "pipelined", progress: bool = True,
) -> Engine:
    """Load a model (a folder, a .gguf file, a hub id, or None for the embedded default).

    gpu_memory (bytes or a size such as "20GiB") caps what stays on the device; layers that do
    not fit stream from host memory. ctx reserves the KV cache (default: min(4096, the model's
    maximum)).
    """
    if isinstance(gpu_memory, str):
        gpu_memory = parse_size(gpu_memory)
    offload = OffloadConfig(gpu_memory=gpu_memory, prefetch_depth=prefetch_depth,
                            link_gbps=link_gbps, schedule=schedule)
    runtime = RuntimeConfig(dtype=dtype, device=device, ctx=ctx)
    return Engine(model, runtime=runtime, offload=offload, progress=progress)


def _make_link(device: torch.device, link_gbps: float | None):
    if device.type == "cuda":
        if link_gbps is not None:
            raise FerryError("--link-gbps emulates a link on the CPU device only; a GPU has a real one")
        return CudaLink(device)
    return EmulatedLink(link_gbps) if link_gbps else InOrderLink()


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


def load_tokenizer(folder):
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

"""The Python API: `ferry.load()` returns an Engine that generates from prompts.

The engine loads the checkpoint once; each generation reuses the KV cache and rope tables,
growing them only when a request needs more context than any before it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import torch

from ferry.errors import FerryError
from ferry.model.rope import rope_for
from ferry.model.quant import QuantConfig
from ferry.offload.checkpoint import open_checkpoint
from ferry.offload.loader import load_model
from ferry.offload.planner import OffloadConfig, Plan, default_budgets, make_plan, parse_size
from ferry.offload.sources import resolve_model
from ferry.offload.transfer import CudaLink, EmulatedLink, InOrderLink
from ferry.model.forward import forward
from ferry.offload.executor import PassView
from ferry.scheduler.schedule import FULL, SPARSE
from ferry.scheduler.adaptive import ConfidenceTuner
from ferry.sparse.calibrate import load_or_calibrate, thresholds_for
from ferry.scheduler.correction import CorrectionConfig, decode_sirius
from ferry.scheduler.decode import DecodeStats, Passes, decode_stepwise
from ferry.model.kv_cache import KVCache
from ferry.scheduler.sampling import Sampler, SamplingConfig
from ferry.sparse.config import SparsityConfig
from ferry.offload.accounting import kept_neurons
from ferry.sparse.griffin import griffin_order, griffin_scores
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
    mode: str  # dense, sparse or sirius
    mlp_density: float  # fraction of MLP neurons a sparse step uses
    d_sparse: float  # fraction of parameters a sparse step reads (attention, kept MLP, lm_head)
    sparse_steps: int
    full_passes: int  # full-weight passes after the prefill
    aal: float | None  # tokens committed per full pass (sirius), after the prefill's first
    corrected_fraction: float  # committed tokens that replaced a rejected draft
    wasted_drafts: int  # sparse tokens a full pass rejected or never looked at
    effective_density: float  # (sparse_steps * d_sparse + full_passes) / tokens after the first
    select_s: float  # choosing and arranging the sparse set after the prefill
    draft_confidence: float | None  # adaptive period: the confidence threshold in use at the end
    speculative_steps: int  # sparse steps run while a full pass streamed (in sparse_steps)
    speculative_kept: int  # full passes whose speculative continuation was kept


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
        offload: OffloadConfig = OffloadConfig(), sparsity: SparsityConfig = SparsityConfig(),
        correction: CorrectionConfig | None = None, progress: bool = True, tokenizer=None,
        quant: QuantConfig = QuantConfig(),
    ):
        self.runtime, self.offload, self.sparsity, self.quant = runtime, offload, sparsity, quant
        self.correction = correction or CorrectionConfig(mode="sirius" if sparsity.sparsity > 0 else "dense")
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
            pipelined=offload.schedule == "pipelined", progress=progress, quant=quant)
        self.executor = self.weights.layers.executor
        self.sparse_weights = replace(self.weights, layers=PassView(self.executor, SPARSE))
        self.kept = kept_neurons(self.config.intermediate_size, sparsity.sparsity)
        if self.uses_sparsity and sparsity.method == "cats":
            table = load_or_calibrate(self.folder, self.config, self.weights, self.tokenizer,
                                      self.dtype, self.device, progress, variant=quant.method)
            self.executor.set_thresholds(thresholds_for(table, sparsity.sparsity))
        self.tuner = None
        if self.correction.adaptive:  # statistics persist across prompts of this engine
            self.tuner = ConfidenceTuner(self.correction.period - 1, self.sparse_cost_ratio(),
                                         fixed=self.correction.draft_confidence)
        self.cache: KVCache | None = None
        self.rope = None
        self.profiler = None  # set by ferry.profiler around a profiled generation

    def sparse_cost_ratio(self) -> float:
        """Cost of a sparse step relative to a full pass under this plan: link bytes when the
        full pass streams weights, else the fraction of parameters a sparse step reads."""
        moved = self.plan.link_bytes
        if moved["full_pass"] > 0:
            return moved["sparse_step"] / moved["full_pass"]
        return self.d_sparse

    @property
    def uses_sparsity(self) -> bool:
        return self.correction.mode != "dense"

    def _make_plan(self) -> Plan:
        budget, host = default_budgets(self.device.type, self.offload)
        ctx = self.runtime.ctx or min(self.config.max_position_embeddings, DEFAULT_CTX)
        sparse = self.correction.mode != "dense"
        return make_plan(
            self.config, dtype_bytes=torch.finfo(self.dtype).bits // 8, budget_bytes=budget,
            host_available_bytes=host, ctx=ctx, prefetch_depth=self.offload.prefetch_depth,
            device=self.device.type, sparsity=self.sparsity.sparsity if sparse else 0.0,
            sparse_method=self.sparsity.method, prefix_resident=self.offload.resident_sparse,
            quant=self.quant)

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
        stop_ids = frozenset() if ignore_eos else self.stop_ids
        stream = TokenStream(iter(()))
        stream._tokens = self._run(stream, prompt, ids, max_new_tokens, sampler, stop_ids)
        return stream

    def _prefill(self, ids: list[int], stats: DecodeStats, weights) -> torch.Tensor:
        """Full-weight prefill; with Griffin, the prompt's activations choose each layer's
        neurons, which are then moved to the front of the layer's MLP."""
        griffin = self.uses_sparsity and self.sparsity.method == "griffin"
        scores: list[torch.Tensor] = [None] * self.config.num_layers  # type: ignore[list-item]

        def observe(layer: int, a: torch.Tensor, z: torch.Tensor) -> None:
            scores[layer] = griffin_scores(z)

        t0 = time.perf_counter()
        self.executor.expect([FULL, SPARSE if self.uses_sparsity else FULL])  # this pass, then
        self.cache.reset()
        prompt = torch.tensor(ids, dtype=torch.long, device=self.device)
        logits = forward(self.config, weights, self.rope, self.cache, prompt, 0,
                         all_logits=False, observe_mlp=observe if griffin else None)[-1]
        stats.prefill_s = time.perf_counter() - t0
        if griffin:
            t0 = time.perf_counter()
            orders = [griffin_order(s, self.kept).cpu() for s in scores]
            self.executor.reorder_neurons(orders, self.kept)
            stats.select_s = time.perf_counter() - t0
        return logits

    def _run(self, stream, prompt, ids, max_new_tokens, sampler, stop_ids) -> Iterator[Token]:
        stats = DecodeStats()
        detok = Detokenizer(self.tokenizer)
        new: list[int] = []
        link_before = self.link.stats()
        if max_new_tokens > 0:
            full, sparse = self._views()
            first = sampler(self._prefill(ids, stats, full))
            resident = self.uses_sparsity and self.executor.moves_nothing(SPARSE)
            if resident:  # sparse steps bypass the fetch queue (and may run inside a full pass)
                sparse = replace(sparse, layers=sparse.layers.as_resident())
            passes = Passes(self.config, self.rope, self.cache, full, sparse,
                            self.executor.expect, sparse_resident=resident)
            mode = self.correction.mode if self.uses_sparsity else "dense"
            if mode == "sirius":
                # Speculation uses compute the full pass leaves idle while it waits on the link.
                speculate = self.correction.speculate and resident and not self.executor.moves_nothing(FULL)
                tokens = decode_sirius(passes, first, max_new_tokens, sampler, stop_ids, stats,
                                       self.correction, self.tuner, speculate, self.config.num_layers)
            else:
                tokens = decode_stepwise(passes, first, max_new_tokens, sampler, stop_ids, stats,
                                         sparse=mode == "sparse")
            for token in tokens:
                new.append(token)
                yield Token(token, detok.push(token))
        else:
            stats.finish_reason = "length"
        tail = detok.flush()
        if tail:
            yield Token(-1, tail)
        link = self.link.stats().minus(link_before)
        stream.result = Generation(prompt, detok.text, new, self._stats(len(ids), new, stats, link))

    def _views(self):
        """Full and sparse weights for a generation: timed views while a profiler is attached."""
        if self.profiler is None:
            return self.weights, self.sparse_weights
        return self.profiler.views(self.weights, self.sparse_weights)

    def _stats(self, prompt_len: int, new: list[int], s: DecodeStats, link) -> GenerationStats:
        mode = self.correction.mode if self.uses_sparsity else "dense"
        d_sparse = self.d_sparse if self.uses_sparsity else 1.0
        after_first = max(0, len(new) - 1)
        return GenerationStats(
            prompt_tokens=prompt_len, new_tokens=len(new), prefill_s=s.prefill_s, decode_s=s.decode_s,
            tokens_per_s=after_first / s.decode_s if s.decode_s > 0 else 0.0,
            finish_reason=s.finish_reason, h2d_bytes=link.bytes,
            h2d_bytes_per_token=link.bytes / max(1, len(new)), h2d_gbps=link.gbps, overlap=link.overlap,
            mode=mode, mlp_density=self.mlp_density if self.uses_sparsity else 1.0, d_sparse=d_sparse,
            sparse_steps=s.sparse_steps, full_passes=s.full_passes,
            aal=after_first / s.full_passes if mode == "sirius" and s.full_passes else None,
            corrected_fraction=s.corrections / after_first if after_first else 0.0,
            wasted_drafts=s.sparse_steps - s.accepted if mode == "sirius" else 0,
            effective_density=(s.sparse_steps * d_sparse + s.full_passes) / after_first if after_first else 1.0,
            select_s=s.select_s,
            draft_confidence=self.tuner.threshold() if self.tuner and mode == "sirius" else None,
            speculative_steps=s.speculative_steps, speculative_kept=s.speculative_kept,
        )

    @property
    def mlp_density(self) -> float:
        return self.kept / self.config.intermediate_size if self.sparsity.method == "griffin" else 1 - self.sparsity.sparsity

    @property
    def d_sparse(self) -> float:
        """Fraction of parameters a sparse step reads: attention, the MLP rows it uses, lm_head
        (embeddings not counted). CATS reads every gate row and the kept up/down rows."""
        cfg = self.config
        attn = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.hidden_size * cfg.q_size
        mlp = 3 * cfg.hidden_size * cfg.intermediate_size
        keep = self.mlp_density
        used = mlp * keep if self.sparsity.method == "griffin" else mlp * (1 + 2 * keep) / 3
        head = cfg.vocab_size * cfg.hidden_size
        return (cfg.num_layers * (attn + used) + head) / (cfg.num_layers * (attn + mlp) + head)

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
            self.rope = rope_for(self.config, need, self.dtype, self.device)


def load(
    model: str | os.PathLike | None = None, *, dtype: str = "auto", device: str = "auto",
    ctx: int | None = None, gpu_memory: int | str | None = None, prefetch_depth: int = 2,
    link_gbps: float | None = None, schedule: str = "pipelined", resident_sparse: bool = True,
    sparsity: float = 0.0,
    sparse_method: str = "griffin", mode: str | None = None, period: int | str = 16,
    max_period: int = 16, draft_confidence: float | None = None, threshold: float = 0.1,
    accept: str = "threshold", speculate: bool = True, progress: bool = True, quant: str = "none",
    quant_group: int = 128,
) -> Engine:
    """Load a model (a folder, a .gguf file, a hub id, or None for the embedded default).

    gpu_memory (bytes or a size such as "20GiB") caps what stays on the device; layers that do
    not fit stream from host memory. ctx reserves the KV cache (default: min(4096, the model's
    maximum)). sparsity > 0 drops that fraction of MLP neurons in sparse steps; mode (default:
    sirius when sparsity > 0, else dense) adds a full-weight correction pass every `period` tokens;
    period="auto" ends each chunk when the sparse model's confidence drops below draft_confidence
    (None: chosen automatically), at most max_period tokens. speculate: while a full pass streams,
    the resident sparse model drafts the next chunk (kept when the pass accepts the whole chunk).
    quant ("int8", "int4") stores the decoder layers' weights as group-wise integers (groups of at
    most quant_group values), quantized once and cached on disk; they cross the link and stay
    resident in that form.
    """
    if isinstance(gpu_memory, str):
        gpu_memory = parse_size(gpu_memory)
    offload = OffloadConfig(gpu_memory=gpu_memory, prefetch_depth=prefetch_depth,
                            link_gbps=link_gbps, schedule=schedule, resident_sparse=resident_sparse)
    runtime = RuntimeConfig(dtype=dtype, device=device, ctx=ctx)
    sparse = SparsityConfig(sparsity=sparsity, method=sparse_method)
    adaptive = period == "auto"
    correction = CorrectionConfig(
        mode=mode or ("sirius" if sparsity > 0 else "dense"), period=max_period if adaptive else int(period),
        threshold=threshold, accept=accept, adaptive=adaptive, draft_confidence=draft_confidence,
        speculate=speculate)
    return Engine(model, runtime=runtime, offload=offload, sparsity=sparse, correction=correction,
                  progress=progress, quant=QuantConfig(method=quant, group_size=quant_group))


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

"""`build_runtime(config)`: everything a generation needs, loaded once.

In order: the model source becomes a local checkpoint folder, device and dtype are chosen, the
tokenizer and its stop ids are read, the memory planner decides what stays on the device, the
link is opened, the weights are loaded (quantized and cached when asked) into the executor,
CATS thresholds are calibrated when asked, and the adaptive period's tuner is made. Each step is
one small function below; `Runtime` holds the results.

The KV cache and rope tables (`Runtime.context`) are sized per request and reused: they grow
only when a request needs more context than any before it, up to what the plan reserved, and
keep what they hold when they grow. The context also remembers the sequence its cache holds, so
a request that begins with it prefills only what is new (a chat's next turn).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ferry.engine.config import DTYPES, FerryConfig, planned_ctx
from ferry.errors import FerryError, SettingError
from ferry.kernels.threads import fitted_threads
from ferry.model.config import ModelConfig
from ferry.model.kv_cache import KVCache
from ferry.model.rope import Rope, rope_for
from ferry.model.weights import Kind, ModelWeights
from ferry.offload.accounting import d_sparse, sparse_cost_ratio
from ferry.offload.checkpoint import Checkpoint, open_checkpoint, source_quant
from ferry.offload.executor import LayerExecutor, PassView
from ferry.offload.loader import LoadReport, load_model
from ferry.offload.planner import Plan, default_budgets, make_plan
from ferry.offload.sources import resolve_model
from ferry.offload.cpu_links import EmulatedLink, InOrderLink
from ferry.offload.transfer import CudaLink, Link
from ferry.scheduler.adaptive import ConfidenceTuner
from ferry.scheduler.step_graphs import StepGraphs
from ferry.sparse.calibrate import load_or_calibrate, thresholds_for


@dataclass
class Context:
    """The KV cache and rope tables of the current request size (None before the first), and
    the sequence the cache holds: `tokens[:cache.full_length]` have full-weight KV entries.
    With Griffin, `scores[layer]` [I] sums the squared unit activations of the last prompt's
    `scored` tokens (neurons in the layer buffer's current order), so a prompt extending it
    chooses the neurons a cold prefill would."""

    cache: KVCache | None = None
    rope: Rope | None = None
    tokens: list[int] = field(default_factory=list)
    scores: list[torch.Tensor] | None = None
    scored: int = 0
    graphs: StepGraphs | None = None  # captured steps, kept while the cache, rope and weights stay

    def forget(self) -> None:
        self.tokens, self.scores, self.scored = [], None, 0
        if self.cache is not None:
            self.cache.reset()


@dataclass
class Runtime:
    """The loaded parts of one model under one configuration."""

    config: FerryConfig
    folder: Path  # the local checkpoint folder
    checkpoint: Checkpoint
    model: ModelConfig
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    stop_ids: frozenset[int]
    plan: Plan
    link: Link
    weights: ModelWeights  # full-weight passes
    sparse_weights: ModelWeights  # sparse steps (the selected neurons)
    executor: LayerExecutor
    load_report: LoadReport
    tuner: ConfidenceTuner | None  # adaptive period; its statistics persist across requests
    context: Context

    def close(self) -> None:
        """Stop the link's worker (emulated link); the runtime is unusable afterwards."""
        self.link.close()


def build_runtime(config: FerryConfig, tokenizer: Any = None) -> Runtime:
    """Load the model `config` describes. tokenizer: one already loaded for this model.
    The runtime's config is `config` with quant='auto' resolved against the checkpoint."""
    folder, checkpoint, config, device, dtype = _resolve(config)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton kernels launch on the current device
    if config.runtime.threads != "auto":
        torch.set_num_threads(config.runtime.threads)
    tokenizer = tokenizer or load_tokenizer(folder)
    stops = stop_ids(checkpoint.hf_config, tokenizer, folder)
    plan = _plan(config, checkpoint, device, dtype).check()
    link = make_link(device, config.offload.emulate_link_gbps)
    weights, report = load_model(checkpoint, plan, dtype, device, link,
                                 pipelined=config.offload.schedule == "pipelined",
                                 progress=config.runtime.progress, quant=config.quant)
    executor = weights.layers.executor
    if config.sparse and config.sparsity.method == "cats":
        table = load_or_calibrate(folder, checkpoint.config, weights, tokenizer, dtype, device,
                                  config.runtime.progress, variant=weight_variant(config, plan))
        executor.set_thresholds(thresholds_for(table, config.sparsity.sparsity))
    return Runtime(
        config=config, folder=folder, checkpoint=checkpoint, model=checkpoint.config, device=device,
        dtype=dtype, tokenizer=tokenizer, stop_ids=stops, plan=plan, link=link, weights=weights,
        sparse_weights=replace(weights, layers=PassView(executor, Kind.SPARSE)), executor=executor,
        load_report=report, tuner=make_tuner(config, plan, checkpoint.config), context=Context())


def thread_scope(rt: Runtime):
    """What a generation runs inside: torch's team fitted to the free cores (threads auto); on a
    GPU its device as the thread's current one (Triton launches there, whichever thread runs the
    generation); else nothing to do (a fixed count, set at load)."""
    if rt.device.type == "cuda":
        return torch.cuda.device(rt.device)
    return fitted_threads() if rt.config.runtime.threads == "auto" and rt.device.type == "cpu" else nullcontext()


def _resolve(config: FerryConfig) -> tuple[Path, Checkpoint, FerryConfig, torch.device, torch.dtype]:
    """The model's folder and checkpoint, the config with quant='auto' resolved, device, dtype."""
    folder = resolve_model(config.runtime.model)
    checkpoint = open_checkpoint(folder)
    config = replace(config, quant=config.quant.for_source(source_quant(checkpoint)))
    device = torch.device(pick_device(config.runtime.device))
    return folder, checkpoint, config, device, pick_dtype(config.runtime.dtype, checkpoint.hf_config, device)


def _plan(config: FerryConfig, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> Plan:
    budget, host = default_budgets(device, config.offload)
    return plan_for(config, checkpoint.config, device.type, torch.finfo(dtype).bits // 8, budget, host)


def fitting_batch(config: FerryConfig, most: int) -> int:
    """The largest batch size up to `most` whose memory plan fits (1 when none does: loading
    then reports what does not fit)."""
    _, checkpoint, config, device, dtype = _resolve(config)
    for size in range(most, 1, -1):
        if _plan(replace(config, runtime=replace(config.runtime, batch_size=size)), checkpoint, device, dtype).fits:
            return size
    return 1


def plan_for(config: FerryConfig, model: ModelConfig, device: str, dtype_bytes: int, budget: int,
             host: int) -> Plan:
    """The memory plan of this configuration (what `build_runtime` loads and `ferry plan` shows)."""
    return make_plan(
        model, dtype_bytes=dtype_bytes, budget_bytes=budget, host_available_bytes=host,
        ctx=planned_ctx(config.runtime.ctx, model.max_position_embeddings),
        prefetch_depth=config.offload.prefetch_depth, device=device, sparsity=config.plan_sparsity,
        sparse_method=config.sparsity.method, prefix_resident=config.offload.resident_sparse,
        quant=config.quant, batch_size=config.runtime.batch_size)


def weight_variant(config: FerryConfig, plan: Plan) -> str:
    """What, beyond the checkpoint and dtype, makes these weights these: the quantization, the
    group size in use and fitting (CATS thresholds are calibrated on them)."""
    if not config.quant.enabled:
        return "none"
    return f"{config.quant.method}-g{plan.quant_group}{'' if config.quant.fit else '-plain'}"


def make_tuner(config: FerryConfig, plan: Plan, model: ModelConfig) -> ConfidenceTuner | None:
    c = config.correction
    if not (c.adaptive and config.sparse):
        return None
    ratio = sparse_cost_ratio(plan.step_bytes, d_sparse(model, config.sparsity.sparsity, config.sparsity.method))
    return ConfidenceTuner(c.period - 1, ratio, fixed=c.draft_confidence)


def ensure_context(rt: Runtime, prompt_len: int, max_new_tokens: int) -> Context:
    """Size the KV cache and rope tables for a request (allocating only when they grow)."""
    limit = rt.plan.ctx  # what the memory plan reserved
    fixed = rt.config.runtime.ctx
    if prompt_len > limit:
        hint = "" if fixed else " (load with a larger ctx)"
        raise FerryError(f"the prompt has {prompt_len} tokens, more than the context of {limit} tokens{hint}")
    # On a GPU the planned context at once: the plan reserved it, and growing would briefly hold
    # two caches (and recapture the step graphs); on the CPU as the requests need it.
    need = fixed or (limit if rt.device.type == "cuda" else min(limit, prompt_len + max(max_new_tokens, 1)))
    ctx = rt.context
    if ctx.cache is None or ctx.cache.capacity < need:
        ctx.graphs = None  # they hold the old cache: let it go before the new one is allocated
        cache = KVCache(rt.model, need, rt.dtype, rt.device)
        if ctx.cache is not None:  # keep the previous sequence for the next request to reuse
            cache.copy_prefix(ctx.cache, ctx.cache.full_length)
        ctx.cache, ctx.rope = cache, rope_for(rt.model, need, rt.dtype, rt.device)
    return ctx


def make_link(device: torch.device, emulate_gbps: float | None) -> Link:
    if device.type == "cuda":
        if emulate_gbps is not None:
            raise SettingError("emulate_link_gbps", "works on the CPU device only; a GPU has a real link")
        return CudaLink(device)
    return EmulatedLink(emulate_gbps) if emulate_gbps else InOrderLink()


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, hf_config, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's half precision on GPU; bf16 on CPU, where its GEMV is fastest."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda" and getattr(hf_config, "dtype", None) in (torch.float16, "float16"):
        return torch.float16
    return torch.bfloat16


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer. Its files are as untrusted as the weights, and the tokenizers
    library raises a bare Exception for a malformed tokenizer.json, hence the broad catch."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 (see the docstring); KeyboardInterrupt still passes
        raise FerryError(f"could not load the tokenizer from {folder} (malformed tokenizer files?): "
                         f"{_first_line(err)}") from None


def stop_ids(hf_config, tokenizer, folder: Path) -> frozenset[int]:
    """Every id the checkpoint calls end-of-sequence (Llama 3 has several)."""
    sources = [("config.json", getattr(hf_config, "eos_token_id", None)),
               ("the tokenizer", tokenizer.eos_token_id)]
    path = folder / "generation_config.json"
    if path.is_file():
        sources.append((str(path), _generation_eos(path)))
    ids: set[int] = set()
    for where, src in sources:
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise FerryError(f"{where}: eos_token_id must be a token id or a list of them, got {src!r}")
            ids.add(i)
    return frozenset(ids)


def _generation_eos(path: Path) -> Any:
    """eos_token_id of generation_config.json; a malformed file is named, not a traceback."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path.parent).eos_token_id
    except Exception as err:  # noqa: BLE001 (transformers raises OSError, ValueError, TypeError...)
        raise FerryError(f"could not read {path}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    """An exception as one line with its type: a bare KeyError reads 'added_tokens' otherwise."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")

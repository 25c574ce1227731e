"""The generation loop: a plain function over a runtime and a request.

`generate(rt, request)` is a generator of `Token`s whose return value is the finished
`Generation` (`TokenStream` keeps it as `.result`). One generation is: size the context, prefill
with the full weights (with Griffin, the prompt's activations choose each layer's neurons, which
are then moved to the front of the layer), then one of the scheduler's decode loops: dense,
sparse-only, or sparse with periodic correction.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Generator

import torch

from ferry.engine.runtime import Runtime, ensure_context, thread_scope
from ferry.engine.text import Detokenizer, Prompt, encode_prompt
from ferry.errors import SettingError
from ferry.model.forward import forward
from ferry.model.weights import Kind, ModelWeights
from ferry.offload.accounting import d_sparse, kept_neurons, mlp_density
from ferry.offload.transfer import LinkStats, synchronize
from ferry.scheduler.correction import decode_sirius
from ferry.scheduler.decode import DecodeStats, Passes, decode_stepwise
from ferry.scheduler.sampling import Sampler, SamplingConfig
from ferry.scheduler.step_graphs import StepGraphs, available as graphs_available
from ferry.sparse.griffin import griffin_order, griffin_sumsq


@dataclass(frozen=True)
class Request:
    prompt: Prompt  # a text, or a conversation: a list of {"role", "content"} messages
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    chat: bool | None = None  # wrap in the chat template; None: when the tokenizer has one
    ignore_eos: bool = False  # keep generating past stop tokens (benchmarks of fixed length)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise SettingError("max_new_tokens", f"must be an integer >= 0, got {self.max_new_tokens!r}")


@dataclass(frozen=True)
class Token:
    id: int | None  # None: no new token, only text the detokenizer held back until the end
    text: str  # the text this token adds (may be empty while a character is incomplete)


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose KV entries the previous sequence left (not prefilled)
    new_tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float  # decode steps per second (the first token comes from prefill)
    finish_reason: str  # stop (a stop token), length (max new tokens) or context (cache full)
    h2d_bytes: int  # bytes copied host -> device during this generation
    prefill_h2d_bytes: int  # of those, during the prefill (and the selected rows' first upload)
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
    prompt: Prompt
    text: str
    token_ids: list[int]  # new tokens only, the stop token included when one ended the text
    stats: GenerationStats

    def to_dict(self) -> dict:
        return asdict(self)


class TokenStream:
    """Iterator over the tokens of one generation; `.result` is the Generation once exhausted."""

    def __init__(self, tokens: Generator[Token, None, Generation]):
        self._tokens = tokens
        self.result: Generation | None = None

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
        try:
            return next(self._tokens)
        except StopIteration as done:
            self.result = done.value
            raise

    def close(self) -> None:
        """End the generation now (a client went away): no more steps run, `.result` stays None.
        The KV cache keeps what was committed, so the next request can still reuse it."""
        self._tokens.close()


Views = tuple[ModelWeights, ModelWeights]  # the weights full passes and sparse steps run on


def generate(rt: Runtime, request: Request, views: Views | None = None) -> Generator[Token, None, Generation]:
    """Tokens as they are committed; the generator's return value is the Generation. A bad
    request (empty, or longer than the context) raises here, before the first token.
    views: other weights to run on (ferry.profile's timed views); by default the runtime's own."""
    ids = encode_prompt(rt.tokenizer, request.prompt, request.chat, rt.model.vocab_size)
    ensure_context(rt, len(ids), request.max_new_tokens)
    return _tokens(rt, request, ids, views)


def _tokens(rt: Runtime, request: Request, ids: list[int], views: Views | None) -> Generator[Token, None, Generation]:
    with thread_scope(rt):
        return (yield from _run(rt, request, ids, views))


def _run(rt: Runtime, request: Request, ids: list[int], views: Views | None) -> Generator[Token, None, Generation]:
    ctx = rt.context
    stats, detok, new = DecodeStats(), Detokenizer(rt.tokenizer), []
    link_before = rt.link.stats()
    if request.max_new_tokens == 0:
        stats.finish_reason = "length"
    else:
        full, sparse = views or (rt.weights, rt.sparse_weights)
        sampler = Sampler(request.sampling)
        first = sampler(prefill(rt, ids, stats, full))
        stats.prefill_bytes = rt.link.stats(wait=False).bytes - link_before.bytes
        passes = make_passes(rt, full, sparse, ctx, graphs=views is None)  # timed views time each layer
        for token in decode(rt, passes, first, request, sampler, stats):
            new.append(token)
            ctx.tokens.append(token)  # the sequence the cache holds, for the next request
            yield Token(token, detok.push(token))
    tail = detok.flush()
    if tail:
        yield Token(None, tail)
    link = rt.link.stats().minus(link_before)
    return Generation(request.prompt, detok.text, new, generation_stats(rt, len(ids), new, stats, link))


def prefill(rt: Runtime, ids: list[int], stats: DecodeStats, weights: ModelWeights | None = None) -> torch.Tensor:
    """Full-weight prefill of a prompt; logits [V] for the next token. Leading tokens the
    previous sequence left in the cache are not computed again (`reusable`). With Griffin the
    prompt's activations choose each layer's neurons, which then form a prefix of the layer."""
    ctx = ensure_context(rt, len(ids), 0)
    start, griffin = reusable(rt, ids), uses_griffin(rt)
    sums: list[torch.Tensor] = [None] * rt.model.num_layers  # type: ignore[list-item]

    def observe(layer: int, a: torch.Tensor, z: torch.Tensor) -> None:
        s = griffin_sumsq(z)  # sums over tokens: a long pass's chunks add up
        sums[layer] = s if sums[layer] is None else sums[layer] + s

    t0 = time.perf_counter()
    rt.executor.expect([Kind.FULL, Kind.SPARSE if rt.config.sparse else Kind.FULL])  # this pass, then
    ctx.cache.rollback(start)
    ctx.tokens = list(ids)
    prompt = torch.tensor(ids[start:], dtype=torch.long, device=rt.device)
    logits = forward(rt.model, weights or rt.weights, ctx.rope, ctx.cache, prompt, start,
                     all_logits=False, observe_mlp=observe if griffin else None)[-1]
    ctx.cache.wrote(start, len(ids) - start, full=True)
    synchronize(rt.device)  # the pass's kernels, not just their queueing
    stats.prefill_s, stats.reused_tokens = time.perf_counter() - t0, start
    if griffin:
        t0 = time.perf_counter()
        select_neurons(rt, sums if not start else [s + old for s, old in zip(sums, ctx.scores)], len(ids))
        synchronize(rt.device)
        stats.select_s = time.perf_counter() - t0
    return logits


def uses_griffin(rt: Runtime) -> bool:
    return rt.config.sparse and rt.config.sparsity.method == "griffin"


def reusable(rt: Runtime, ids: list[int]) -> int:
    """How many leading prompt tokens keep the KV entries the previous sequence left: its common
    prefix with the prompt, over full-weight entries only, leaving at least one token to prefill.
    With Griffin, all of the last prompt's scored tokens or none: their activation scores are
    kept as one sum, which cannot be taken apart."""
    ctx = rt.context
    if not rt.config.runtime.reuse_prefix or ctx.cache is None:
        return 0
    held = ctx.tokens[:ctx.cache.full_length]
    limit, n = min(len(held), len(ids) - 1), 0
    while n < limit and held[n] == ids[n]:
        n += 1
    if uses_griffin(rt):
        return ctx.scored if ctx.scores is not None and 0 < ctx.scored <= n else 0
    return n


def select_neurons(rt: Runtime, sums: list[torch.Tensor], scored: int) -> None:
    """Griffin: keep each layer's top neurons by the prompt's scores and move them to the front
    of the layer; the scores follow the neurons, for the next prompt to extend."""
    kept = kept_neurons(rt.model.intermediate_size, rt.config.sparsity.sparsity)
    orders = [griffin_order(s, kept) for s in sums]
    rt.executor.reorder_neurons([order.cpu() for order in orders], kept)
    rt.context.scores = [s[order] for s, order in zip(sums, orders)]
    rt.context.scored = scored


def make_passes(rt: Runtime, full: ModelWeights, sparse: ModelWeights, ctx=None, graphs: bool = False) -> Passes:
    """The passes a decode loop runs. When the sparse set is all on the device its steps bypass
    the fetch queue (so they may run between the layers of a full pass); with `graphs` (and
    CUDA), one-token steps on device-resident weights replay CUDA graphs."""
    ctx = ctx or rt.context
    resident = rt.config.sparse and rt.executor.moves_nothing(Kind.SPARSE)
    if resident:
        sparse = replace(sparse, layers=sparse.layers.as_resident())
    step_graphs, full_resident = None, None
    if graphs and rt.config.runtime.cuda_graphs and graphs_available(rt.device):
        if rt.executor.moves_nothing(Kind.FULL):
            full_resident = replace(full, layers=full.layers.as_resident())
        if resident or full_resident is not None:  # some one-token step will replay
            step_graphs = ctx.graphs = step_graphs_for(rt, ctx)
    return Passes(rt.model, ctx.rope, ctx.cache, full, sparse, rt.executor.expect, sparse_resident=resident,
                  graphs=step_graphs, full_resident=full_resident)


def step_graphs_for(rt: Runtime, ctx) -> StepGraphs:
    """The context's captured steps while they still hold: the same KV cache and rope tables, and
    no weight buffer moved since (the store's epoch); else a fresh set."""
    epoch = rt.executor.store.epoch
    old = ctx.graphs
    if old is not None and old.cache is ctx.cache and old.rope is ctx.rope and old.epoch == epoch:
        return old
    return StepGraphs(rt.model, ctx.rope, ctx.cache, epoch)


def decode(rt: Runtime, passes: Passes, first: int, request: Request, sampler: Sampler,
           stats: DecodeStats):
    """The decode loop the configured mode runs (committed token ids, the first included)."""
    stops = frozenset() if request.ignore_eos else rt.stop_ids
    mode, n = rt.config.correction.mode, request.max_new_tokens
    if mode != "sirius":
        return decode_stepwise(passes, first, n, sampler, stops, stats, sparse=mode == "sparse")
    # Speculation uses compute the full pass leaves idle while it waits on the link.
    speculate = (rt.config.correction.speculate and passes.sparse_resident
                 and not rt.executor.moves_nothing(Kind.FULL))
    return decode_sirius(passes, first, n, sampler, stops, stats, rt.config.correction, rt.tuner,
                         speculate, rt.model.num_layers)


def full_logits(rt: Runtime, ids: list[int]) -> torch.Tensor:
    """The full model's logits [S, V] (fp32) at every position of a token sequence, from an empty
    cache (quality benchmarks score text with it)."""
    ctx = ensure_context(rt, len(ids), 0)
    ctx.forget()
    seq = torch.tensor(ids, dtype=torch.long, device=rt.device)
    with torch.no_grad():
        return forward(rt.model, rt.weights, ctx.rope, ctx.cache, seq, 0, all_logits=True)


def generation_stats(rt: Runtime, prompt_len: int, new: list[int], s: DecodeStats,
                     link: LinkStats) -> GenerationStats:
    cfg = rt.config
    mode = cfg.correction.mode
    sparse, method = cfg.sparsity.sparsity, cfg.sparsity.method
    density = d_sparse(rt.model, sparse, method) if cfg.sparse else 1.0
    after_first = max(0, len(new) - 1)
    sirius = mode == "sirius"
    return GenerationStats(
        prompt_tokens=prompt_len, reused_tokens=s.reused_tokens, new_tokens=len(new), prefill_s=s.prefill_s, decode_s=s.decode_s,
        tokens_per_s=after_first / s.decode_s if s.decode_s > 0 else 0.0,
        finish_reason=s.finish_reason, h2d_bytes=link.bytes, prefill_h2d_bytes=s.prefill_bytes,
        h2d_bytes_per_token=link.bytes / max(1, len(new)), h2d_gbps=link.gbps, overlap=link.overlap,
        mode=mode, mlp_density=mlp_density(rt.model, sparse, method) if cfg.sparse else 1.0,
        d_sparse=density, sparse_steps=s.sparse_steps, full_passes=s.full_passes,
        aal=after_first / s.full_passes if sirius and s.full_passes else None,
        corrected_fraction=s.corrections / after_first if after_first else 0.0,
        wasted_drafts=s.sparse_steps - s.accepted if sirius else 0,
        effective_density=(s.sparse_steps * density + s.full_passes) / after_first if after_first else 1.0,
        select_s=s.select_s,
        draft_confidence=rt.tuner.threshold() if rt.tuner and sirius else None,
        speculative_steps=s.speculative_steps, speculative_kept=s.speculative_kept,
    )

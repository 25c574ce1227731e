"""The decoder forward pass over S new tokens at consecutive positions, writing the KV cache.

One function serves prefill (S = prompt length), one-token decode (S = 1) and the multi-token
pass over K drafted tokens that the correction step runs; the three entry points below only
choose S and which logits to return. A batched pass (`forward_batch`) runs several sequences'
segments, each against its own KV cache, with one read of each layer's weights: the linear
layers see every segment's rows at once, attention runs per segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

import torch
import torch.nn.functional as F

from ferry.kernels import decode_cpu, decode_gpu
from ferry.kernels.attention import attend
from ferry.kernels.reference import apply_rope, bundled_mlp, rms_norm
from ferry.model.config import ModelConfig
from ferry.model.dequant import QuantNeurons
from ferry.model.packed import PackedMLP, packed_mlp
from ferry.model.weights import LayerWeights, ModelWeights
from ferry.model.kv_cache import KVCache
from ferry.model.rope import Rope


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ (+ bias): w a weight tensor, or quantized weights with their own product
    (`PackedMatrix`, `GroupedMatrix`, `QuantRows`)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    out = w.linear(x)
    return out if bias is None else out + bias


def attention_mask(start: int, s: int, lo: int, window: int | None, device) -> torch.Tensor:
    """Boolean [S, end - lo]: query at start+i sees key at lo+j iff causal and inside the window."""
    q_pos = torch.arange(start, start + s, device=device)[:, None]
    k_pos = torch.arange(lo, start + s, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


@dataclass(frozen=True)
class Segment:
    """One sequence's share of a batched pass: its tokens at positions start..start+S-1 of its
    own KV cache. A pass over several segments reads each layer's weights once for all of them."""

    cache: KVCache
    tokens: torch.Tensor  # [S] token ids
    start: int


@dataclass(frozen=True)
class _Rows:
    """Where a segment's rows sit in the pass's activations, with its rope rows."""

    cache: KVCache
    start: int
    lo: int
    hi: int
    cos: torch.Tensor
    sin: torch.Tensor


def attention(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, rows: list[_Rows], index: int) -> torch.Tensor:
    """Grouped-query attention for x [N, H] (every segment's rows); writes each segment's keys
    and values into its cache at its positions, and each segment attends to its own cache."""
    qkv = linear(x, w.qkv, w.qkv_bias)  # [N, q + 2 kv]: one weight read for every row
    if len(rows) == 1:  # one sequence: its output is the layer's, no staging buffer
        r = rows[0]
        return linear(_attend(cfg, qkv, r.cache.layer(index), r.start, r.cos, r.sin), w.o)
    out = torch.empty(x.shape[0], cfg.q_size, dtype=x.dtype, device=x.device)
    for r in rows:
        out[r.lo:r.hi] = _attend(cfg, qkv[r.lo:r.hi], r.cache.layer(index), r.start, r.cos, r.sin)
    return linear(out, w.o)


def rotate_qk(cfg: ModelConfig, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """Rope on the query and key heads of qkv [S, q + 2 kv] in one pass (they are adjacent):
    q [heads, S, head_dim], k [kv_heads, S, head_dim]."""
    s, heads = qkv.shape[0], cfg.num_heads + cfg.num_kv_heads
    qk = apply_rope(qkv[:, :cfg.q_size + cfg.kv_size].view(s, heads, cfg.head_dim).transpose(0, 1), cos, sin)
    return qk[:cfg.num_heads], qk[cfg.num_heads:]


def _attend(cfg: ModelConfig, qkv: torch.Tensor, layer_cache: tuple, start: int, cos: torch.Tensor,
            sin: torch.Tensor) -> torch.Tensor:
    """One segment: rope, cache writes at start..start+S-1, attention over its cache; [S, q].
    layer_cache: the layer's keys and values [1, kv_heads, L, head_dim] (`KVCache.layer`)."""
    s = qkv.shape[0]
    end = start + s
    k_cache, v_cache = layer_cache
    ops = fused_ops(qkv, k_cache, cos)
    if ops is not None:  # rope and both cache writes in one call; q [heads, S, head_dim]
        q = ops.rope_write(cfg, qkv, cos, sin, k_cache, v_cache, start)
    else:
        q, k = rotate_qk(cfg, qkv, cos, sin)
        v = qkv[:, cfg.q_size + cfg.kv_size:]
        k_cache[0, :, start:end] = k  # [kv_heads, S, head_dim]
        v_cache[0, :, start:end] = v.view(s, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
    window = cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < end else None
    lo = max(0, end - window - s + 1) if window else 0  # oldest key any query still sees
    # Heads sharing a KV head are folded into the query length, so GQA needs no copy of K/V.
    group = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(1, cfg.num_kv_heads, group * s, cfg.head_dim)
    mask = None
    if s > 1:
        mask = attention_mask(start, s, lo, window, qkv.device).repeat(group, 1)  # [group S, keys]
    out = attend(q, k_cache.narrow(2, lo, end - lo), v_cache.narrow(2, lo, end - lo), cfg.attention_scale, mask)
    # reshape, not view: CUDA's memory-efficient SDPA returns a transposed layout (a view where
    # the layout allows, as on the CPU)
    if s == 1:  # [1, kv_heads, group, head_dim] is already the heads in order
        return out.reshape(1, cfg.q_size)
    return out.reshape(cfg.num_heads, s, cfg.head_dim).transpose(0, 1).reshape(s, cfg.q_size)


def fused_ops(x: torch.Tensor, *others: torch.Tensor):
    """The fused small ops a pass over x takes (with tensors it combines with): the CPU's for one
    bf16 token (`decode_cpu`), Triton's on CUDA (`decode_gpu`), or None: torch's ops. Both offer
    rms_norm (with the residual add) and rope_write (rope with the KV cache writes)."""
    for ops in (decode_cpu, decode_gpu):
        if ops.usable(x, *others):
            return ops
    return None


PASS_CHUNK = 512  # rows a layer computes at a time: a long prefill's activations stay this size


def chunk_rows(rows: list[_Rows], lo: int, hi: int) -> list[_Rows]:
    """The segments' shares of pass rows lo..hi-1, placed from 0 (positions and rope rows follow)."""
    out = []
    for r in rows:
        a, b = max(r.lo, lo), min(r.hi, hi)
        if a < b:
            out.append(_Rows(r.cache, r.start + a - r.lo, a - lo, b - lo, r.cos[a - r.lo:b - r.lo],
                             r.sin[a - r.lo:b - r.lo]))
    return out


def decoder_layer(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, rows: list[_Rows], index: int,
                  observe=None) -> torch.Tensor:
    """One layer over the pass's rows x [N, H]. More than PASS_CHUNK rows run in chunks, one
    after another, layer by layer: the weights are still read once per layer, and a chunk's
    queries see the keys earlier chunks wrote (an observer sees each chunk's activations)."""
    if x.shape[0] > PASS_CHUNK:
        for lo in range(0, x.shape[0], PASS_CHUNK):
            hi = min(lo + PASS_CHUNK, x.shape[0])
            part = x[lo:hi]
            out = _layer_rows(cfg, w, part, chunk_rows(rows, lo, hi), index, observe)
            if out is not part:  # the fused ops update the rows in place
                part.copy_(out)
        return x
    return _layer_rows(cfg, w, x, rows, index, observe)


def _layer_rows(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, rows: list[_Rows], index: int,
                observe=None) -> torch.Tensor:
    ops = fused_ops(x, w.attn_norm, w.mlp_norm)
    if ops is not None:  # each norm one call, with the attention's residual add in the second;
        h = ops.rms_norm(x, w.attn_norm, cfg.rms_norm_eps)  # x, the pass's own residual stream,
        h = ops.rms_norm(x, w.mlp_norm, cfg.rms_norm_eps, residual=attention(cfg, w, h, rows, index))
        return x.add_(mlp(w, h, observe))  # is updated in place
    h = rms_norm(x, w.attn_norm, cfg.rms_norm_eps)
    x = x + attention(cfg, w, h, rows, index)
    return x + mlp(w, rms_norm(x, w.mlp_norm, cfg.rms_norm_eps), observe)


def mlp(w: LayerWeights, h: torch.Tensor, observe=None) -> torch.Tensor:
    """The layer's MLP over its parts, whatever form each takes."""
    if isinstance(w.mlp[0], PackedMLP):
        return packed_mlp(h, w.mlp[0], w.mlp_threshold, observe)
    if len(w.mlp) == 1 and isinstance(w.mlp[0], torch.Tensor):
        return bundled_mlp(h, w.mlp[0], w.mlp_threshold, observe)
    # Several parts (selected rows resident and the complement streamed, or quantized records):
    # their outputs add up; an observer sees the activations of all neurons together, in order.
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    record = None if observe is None else (lambda a, z: seen.append((a, z)))
    out = None
    for part in w.mlp:
        if isinstance(part, QuantNeurons):
            y = part.mlp(h, w.mlp_threshold, record)
        else:
            y = bundled_mlp(h, part, w.mlp_threshold, record)
        out = y if out is None else out + y
    if observe is not None:
        observe(torch.cat([a for a, _ in seen], dim=-1), torch.cat([z for _, z in seen], dim=-1))
    return out


def forward(
    cfg: ModelConfig, weights: ModelWeights, rope: Rope, cache: KVCache,
    tokens: torch.Tensor, start: int, all_logits: bool, observe_mlp=None,
) -> torch.Tensor:
    """Run tokens [S] at positions start..start+S-1; fp32 logits [S or 1, V].

    Entries at and after `start` are overwritten, so a later pass can rewrite drafted positions.
    observe_mlp(layer, a, z), if given, sees every layer's MLP activations (a long pass's in
    several calls, each for consecutive rows: see `decoder_layer`).
    """
    return run_layers(forward_layers(cfg, weights, rope, cache, tokens, start, all_logits, observe_mlp))


def forward_layers(
    cfg: ModelConfig, weights: ModelWeights, rope: Rope, cache: KVCache,
    tokens: torch.Tensor, start: int, all_logits: bool, observe_mlp=None,
) -> Generator[int, None, torch.Tensor]:
    """`forward` as a generator that yields each layer's index once the layer is done, so the
    caller can run other work between layers (speculative sparse steps during a full pass);
    the logits are the generator's return value (see `run_layers`)."""
    logits = yield from batch_layers(cfg, weights, rope, [Segment(cache, tokens, start)], all_logits, observe_mlp)
    return logits[0]


def forward_batch(cfg: ModelConfig, weights: ModelWeights, rope: Rope, segments: list[Segment],
                  all_logits: bool, observe_mlp=None) -> list[torch.Tensor]:
    """One pass over several sequences' segments: fp32 logits [S or 1, V] per segment. Each
    layer's weights are read (and streamed) once for all of them; observe_mlp sees the MLP
    activations of every segment's rows together."""
    return run_layers(batch_layers(cfg, weights, rope, segments, all_logits, observe_mlp))


def batch_layers(
    cfg: ModelConfig, weights: ModelWeights, rope: Rope, segments: list[Segment],
    all_logits: bool, observe_mlp=None,
) -> Generator[int, None, list[torch.Tensor]]:
    rows, lo = [], 0
    for seg in segments:
        s, cache, start = seg.tokens.shape[0], seg.cache, seg.start
        if not 0 <= start <= cache.length:
            raise ValueError(f"start {start} leaves a gap after the {cache.length} cached positions")
        if start + s > cache.capacity:
            raise ValueError(f"positions up to {start + s} exceed the KV cache ({cache.capacity})")
        rows.append(_Rows(cache, start, lo, lo + s, rope.cos[start:start + s], rope.sin[start:start + s]))
        lo += s
    tokens = segments[0].tokens if len(segments) == 1 else torch.cat([seg.tokens for seg in segments])
    weights.layers.begin()
    x = F.embedding(tokens.to(weights.embed.device), weights.embed)  # [N, H]
    if x.device != rows[0].cache.k.device:  # embeddings kept in host memory: only these rows move
        x = weights.layers.upload(x)
    for index in range(cfg.num_layers):
        observe = None if observe_mlp is None else (lambda a, z, i=index: observe_mlp(i, a, z))
        x = decoder_layer(cfg, weights.layers.acquire(index), x, rows, index, observe)
        weights.layers.release(index)
        yield index
    for r in rows:
        r.cache.length = r.start + r.hi - r.lo
    if not all_logits:
        x = x[[r.hi - 1 for r in rows]] if len(rows) > 1 else x[-1:]
    logits = linear(rms_norm(x, weights.norm, cfg.rms_norm_eps), weights.lm_head).float()
    weights.layers.end()
    if all_logits:
        return [logits[r.lo:r.hi] for r in rows]
    return [logits[i:i + 1] for i in range(len(rows))]


def run_layers(steps: Generator[int, None, torch.Tensor], between: Callable[[int], None] | None = None) -> torch.Tensor:
    """Drive a `forward_layers` generator to its end, calling between(layer) after each layer."""
    while True:
        try:
            layer = next(steps)
        except StopIteration as done:
            return done.value
        if between is not None:
            between(layer)


def prefill(cfg, weights, rope, cache, tokens: torch.Tensor, observe_mlp=None) -> torch.Tensor:
    """Whole prompt from an empty cache; logits [1, V] for the next token."""
    cache.reset()
    return forward(cfg, weights, rope, cache, tokens, 0, all_logits=False, observe_mlp=observe_mlp)


def decode_one(cfg, weights, rope, cache, token: torch.Tensor) -> torch.Tensor:
    """One token [1] appended at the end of the cache; logits [1, V]."""
    return forward(cfg, weights, rope, cache, token, cache.length, all_logits=False)


def forward_chunk(cfg, weights, rope, cache, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """K tokens at positions start..start+K-1 (the correction pass); logits [K, V]."""
    return forward(cfg, weights, rope, cache, tokens, start, all_logits=True)

"""The decoder forward pass over S new tokens at consecutive positions, writing the KV cache.

One function serves prefill (S = prompt length), one-token decode (S = 1) and the multi-token
pass over K drafted tokens that the correction step runs; the three entry points below only
choose S and which logits to return.
"""

from __future__ import annotations

from typing import Callable, Generator

import torch
import torch.nn.functional as F

from ferry.kernels.reference import apply_rope, bundled_mlp, rms_norm
from ferry.model.config import ModelConfig
from ferry.model.weights import LayerWeights, ModelWeights
from ferry.model.kv_cache import KVCache
from ferry.model.rope import Rope


def attention_mask(start: int, s: int, lo: int, window: int | None, device) -> torch.Tensor:
    """Boolean [S, end - lo]: query at start+i sees key at lo+j iff causal and inside the window."""
    q_pos = torch.arange(start, start + s, device=device)[:, None]
    k_pos = torch.arange(lo, start + s, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def attention(
    cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
) -> torch.Tensor:
    """Grouped-query attention for x [S, H]; writes keys/values at positions start..start+S-1."""
    s = x.shape[0]
    qkv = F.linear(x, w.qkv, w.qkv_bias)  # [S, q + 2 kv]
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = apply_rope(q.view(s, cfg.num_heads, cfg.head_dim).transpose(0, 1), cos, sin)
    k = apply_rope(k.view(s, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1), cos, sin)
    end = start + s
    k_cache[:, start:end] = k  # [kv_heads, S, head_dim]
    v_cache[:, start:end] = v.view(s, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
    window = cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < end else None
    lo = max(0, end - window - s + 1) if window else 0  # oldest key any query still sees
    # Heads sharing a KV head are folded into the query length, so GQA needs no copy of K/V.
    group = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(cfg.num_kv_heads, group * s, cfg.head_dim)
    mask = None
    if s > 1:
        mask = attention_mask(start, s, lo, window, x.device).repeat(group, 1)  # [group S, keys]
    out = F.scaled_dot_product_attention(
        q, k_cache[:, lo:end], v_cache[:, lo:end], attn_mask=mask, scale=cfg.attention_scale
    )  # [kv_heads, group S, head_dim]
    out = out.view(cfg.num_heads, s, cfg.head_dim).transpose(0, 1).reshape(s, cfg.q_size)
    return F.linear(out, w.o)


def decoder_layer(
    cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, cache: KVCache, index: int,
    start: int, cos: torch.Tensor, sin: torch.Tensor, observe=None,
) -> torch.Tensor:
    h = rms_norm(x, w.attn_norm, cfg.rms_norm_eps)
    x = x + attention(cfg, w, h, cache.k[index], cache.v[index], start, cos, sin)
    h = rms_norm(x, w.mlp_norm, cfg.rms_norm_eps)
    if len(w.mlp) == 1:
        return x + bundled_mlp(h, w.mlp[0], w.mlp_threshold, observe)
    # Selected rows resident, complement streamed: the parts' outputs add up; an observer sees
    # the activations of all neurons together, in buffer order.
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    record = None if observe is None else (lambda a, z: seen.append((a, z)))
    out = bundled_mlp(h, w.mlp[0], w.mlp_threshold, record)
    for part in w.mlp[1:]:
        out = out + bundled_mlp(h, part, w.mlp_threshold, record)
    if observe is not None:
        observe(torch.cat([a for a, _ in seen], dim=-1), torch.cat([z for _, z in seen], dim=-1))
    return x + out


def forward(
    cfg: ModelConfig, weights: ModelWeights, rope: Rope, cache: KVCache,
    tokens: torch.Tensor, start: int, all_logits: bool, observe_mlp=None,
) -> torch.Tensor:
    """Run tokens [S] at positions start..start+S-1; fp32 logits [S or 1, V].

    Entries at and after `start` are overwritten, so a later pass can rewrite drafted positions.
    observe_mlp(layer, a, z), if given, sees every layer's MLP activations.
    """
    return run_layers(forward_layers(cfg, weights, rope, cache, tokens, start, all_logits, observe_mlp))


def forward_layers(
    cfg: ModelConfig, weights: ModelWeights, rope: Rope, cache: KVCache,
    tokens: torch.Tensor, start: int, all_logits: bool, observe_mlp=None,
) -> Generator[int, None, torch.Tensor]:
    """`forward` as a generator that yields each layer's index once the layer is done, so the
    caller can run other work between layers (speculative sparse steps during a full pass);
    the logits are the generator's return value (see `run_layers`)."""
    s = tokens.shape[0]
    if not 0 <= start <= cache.length:
        raise ValueError(f"start {start} leaves a gap after the {cache.length} cached positions")
    if start + s > cache.capacity:
        raise ValueError(f"positions up to {start + s} exceed the KV cache ({cache.capacity})")
    cos, sin = rope.cos[start:start + s], rope.sin[start:start + s]
    weights.layers.begin()
    x = F.embedding(tokens.to(weights.embed.device), weights.embed)  # [S, H]
    if x.device != cache.k.device:  # embeddings kept in host memory: only these rows move
        x = weights.layers.upload(x)
    for index in range(cfg.num_layers):
        observe = None if observe_mlp is None else (lambda a, z, i=index: observe_mlp(i, a, z))
        x = decoder_layer(cfg, weights.layers.acquire(index), x, cache, index, start, cos, sin, observe)
        weights.layers.release(index)
        yield index
    cache.length = start + s
    if not all_logits:
        x = x[-1:]
    logits = F.linear(rms_norm(x, weights.norm, cfg.rms_norm_eps), weights.lm_head).float()
    weights.layers.end()
    return logits


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

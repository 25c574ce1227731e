"""One decode step whose every input is a tensor at a fixed address: what a CUDA graph captures
once and replays for each token (`ferry.scheduler.step_graphs`).

`forward`'s decode step slices the KV cache and rope tables by Python positions, so each token
launches different work. Here the token and its position sit in device buffers: rope rows are
gathered by the position, keys and values are written with `index_copy_` (where Triton runs, one
kernel does rope and both writes, reading the position on the device), and attention runs
over a fixed span of the cache (the first `span` positions, a multiple of a bucket) with the
positions after the token masked out. The result equals `decode_one`'s (the masked keys weigh
exactly zero); the cost is attending over up to one bucket of unused positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ferry.kernels import decode_gpu
from ferry.kernels.attention import attend
from ferry.kernels.reference import rms_norm
from ferry.model.config import ModelConfig
from ferry.model.forward import linear, mlp, rotate_qk
from ferry.model.kv_cache import KVCache
from ferry.model.rope import Rope
from ferry.model.weights import LayerWeights, ModelWeights


def span_mask(cfg: ModelConfig, pos: torch.Tensor, span: int) -> torch.Tensor:
    """Boolean [span]: key j is seen by the query at `pos` (causal, inside the sliding window)."""
    keys = torch.arange(span, device=pos.device)
    seen = keys <= pos
    if cfg.sliding_window:
        seen &= pos - keys < cfg.sliding_window
    return seen


def _attention(cfg: ModelConfig, w: LayerWeights, h: torch.Tensor, cache: KVCache, index: int,
               pos: torch.Tensor, rope: Rope, rows: tuple | None, mask: torch.Tensor) -> torch.Tensor:
    """rows: the rope tables' (cos, sin) rows at pos, or None where one kernel reads them at pos
    and writes both caches."""
    qkv = linear(h, w.qkv, w.qkv_bias)  # [1, q + 2 kv]
    if rows is None:
        q = decode_gpu.rope_write(cfg, qkv, rope.cos, rope.sin, cache.k[index], cache.v[index], pos)
    else:
        q, k = rotate_qk(cfg, qkv, *rows)
        v = qkv[:, cfg.q_size + cfg.kv_size:]
        cache.k[index].index_copy_(1, pos, k)  # [kv_heads, 1, head_dim] at the token's position
        cache.v[index].index_copy_(1, pos, v.view(1, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1))
    span = mask.shape[-1]
    group = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(cfg.num_kv_heads, group, cfg.head_dim)
    out = attend(q, cache.k[index, :, :span], cache.v[index, :, :span], cfg.attention_scale, mask)
    return linear(out.reshape(1, cfg.q_size), w.o)


def decode_static(cfg: ModelConfig, weights: ModelWeights, rope: Rope, cache: KVCache, token: torch.Tensor,
                  pos: torch.Tensor, span: int, row: torch.Tensor | None = None) -> torch.Tensor:
    """Token [1] at position pos [1] (both on the device), attending over the cache's first
    `span` positions (span > pos); writes its keys and values; fp32 logits [1, V]. row: the
    token's embedding [1, H] on the device, for embeddings kept in host memory (the caller
    copies it in). The caller moves `cache.length` (this function runs inside a captured
    graph, where Python state does not change)."""
    mask = span_mask(cfg, pos, span).expand(cfg.num_heads // cfg.num_kv_heads, span)
    weights.layers.begin()
    x = F.embedding(token, weights.embed) if row is None else row.clone()  # [1, H]; the norms update x in place
    rows = None if decode_gpu.usable(x, cache.k, rope.cos) else \
        (rope.cos.index_select(0, pos), rope.sin.index_select(0, pos))  # [1, head_dim] each
    for index in range(cfg.num_layers):
        w = weights.layers.acquire(index)
        if decode_gpu.usable(x, w.attn_norm, w.mlp_norm):  # each norm one kernel, with the residual add
            h = decode_gpu.rms_norm(x, w.attn_norm, cfg.rms_norm_eps)
            attended = _attention(cfg, w, h, cache, index, pos, rope, rows, mask)
            x = x + mlp(w, decode_gpu.rms_norm(x, w.mlp_norm, cfg.rms_norm_eps, residual=attended))
        else:
            x = x + _attention(cfg, w, rms_norm(x, w.attn_norm, cfg.rms_norm_eps), cache, index, pos, rope, rows, mask)
            x = x + mlp(w, rms_norm(x, w.mlp_norm, cfg.rms_norm_eps))
        weights.layers.release(index)
    logits = linear(rms_norm(x, weights.norm, cfg.rms_norm_eps), weights.lm_head).float()
    weights.layers.end()
    return logits

"""Attention over a few query rows on the CPU: two batched matmuls and an fp32 softmax.

`attend` takes the layout `ferry.model.forward.attention` builds for grouped-query attention
(the G query heads sharing a KV head folded into the query length) and returns what
`F.scaled_dot_product_attention` returns for it; SDPA is the reference.

Why a second path. For decode (S = 1) and the correction pass (S <= 16) the whole attention is
tens of microseconds of math, and on the CPU SDPA's flash kernel adds to that: it opens an OpenMP
parallel region for every call (30 per token on the default model), and on a machine where
another process holds a core a region waits for the team member the scheduler parked (see
`ferry.kernels.threads`). Measured on one thread too, the manual path is 1.3-1.6x faster at the
default model's shapes (bench/decode_speed.py --attention; docs/benchmarks.md).
Long queries (prefill) stay on SDPA: it never materialises the [rows, keys] scores. The manual
path does, and fp32 copies of K and V (transient; a few MB at the default model's 4096 context).

Numerics: scores, softmax and the weighted sum in fp32, one rounding to the input dtype at the
end, as SDPA's CPU kernels do for bf16/fp16; fp32 results agree with SDPA to ~1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKEND: str | None = None  # None: automatic; "sdpa" or "manual" forces one
MANUAL_MAX_ROWS = 128  # query rows per KV head (G * S) up to which the manual path runs


def pick_backend(q: torch.Tensor) -> str:
    """The manual path for few query rows on the CPU; SDPA otherwise (prefill, accelerators)."""
    if BACKEND is not None:
        return BACKEND
    return "manual" if q.device.type == "cpu" and q.shape[-2] <= MANUAL_MAX_ROWS else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for q [kv_heads, rows, d], k/v [kv_heads, L, d]; mask
    boolean [rows, L] (True: the key is seen) or None. Returns [kv_heads, rows, d] in q's dtype.
    Every row must see at least one key (as causal masks do)."""
    if pick_backend(q) == "manual":
        return attend_manual(q, k, v, scale, mask)
    # 4-D [1, heads, rows, d]: the layout CUDA's fused kernels take (3-D falls back to the math path)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale)[0]


def attend_manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention as two bmm's and an fp32 softmax (`.float()` is a no-op on fp32).

    The mask goes in as an additive bias of the first bmm (baddbmm): one pass over the scores
    instead of a masked_fill over them (measured faster for S = 16)."""
    qf, kt = q.float() * scale, k.float().transpose(1, 2)  # scaling q: rows x d, not rows x L
    if mask is None:
        scores = torch.bmm(qf, kt)  # [kv_heads, rows, L]
    else:
        bias = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
        scores = torch.baddbmm(bias, qf, kt)
    return torch.bmm(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)  # [kv_heads, rows, d]

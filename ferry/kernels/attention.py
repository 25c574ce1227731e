"""Attention for the decoder: SDPA over the grouped-query layout, and a plain two-bmm path.

`attend` takes the layout `ferry.model.forward.attention` builds for grouped-query attention
(the G query heads sharing a KV head folded into the query length) and returns what
`F.scaled_dot_product_attention` returns for it.

SDPA runs by default on every device, called with 4-D tensors [1, kv_heads, rows, d]. Called
3-D, the CPU's SDPA was several times slower (2.3 ms against 0.26 ms for 4096 keys), which is
why a manual path of two batched matmuls and an fp32 softmax served decode on the CPU; with the
4-D call SDPA takes 0.54-0.73 of the manual path's time at every decode and chunk shape measured
(bench/decode_speed.py --attention; docs/benchmarks.md). The manual path stays as an option
(`BACKEND = "manual"`), tested against SDPA, for comparisons on other CPUs.

Numerics: scores, softmax and the weighted sum in fp32, one rounding to the input dtype at the
end, as SDPA's CPU kernels do for bf16/fp16; fp32 results agree with SDPA to ~1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKEND = "sdpa"  # or "manual": two bmm's and an fp32 softmax


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for q [kv_heads, rows, d], k/v [kv_heads, L, d]; mask
    boolean [rows, L] (True: the key is seen) or None. Returns [kv_heads, rows, d] in q's dtype.
    Every row must see at least one key (as causal masks do). q, k, v may also come with a
    leading 1 (SDPA's 4-D layout), and the result then has it too."""
    if q.dim() == 3:
        return attend(q[None], k[None], v[None], scale, mask)[0]
    if BACKEND == "manual":
        return attend_manual(q[0], k[0], v[0], scale, mask)[None]
    # 4-D [1, heads, rows, d]: the layout CUDA's fused kernels take (3-D falls back to the math path)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


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

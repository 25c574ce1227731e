"""Triton kernels for a decoder layer's small ops (`ferry.kernels.decode_gpu` launches them; this
module imports Triton, so only that one imports this).

Each replaces several torch kernels with one: RMSNorm (eight) with the residual add before it,
and rope on the query and key heads with the KV cache writes (about eight). Every value is
rounded to the activations' dtype wherever the torch ops round it (`ferry.kernels.reference`).
Rope is the reference's bit for bit (no fused multiply-adds: the launcher turns them off);
RMSNorm's sum of squares runs as a tree, and its reciprocal root is the GPU's approximate one,
so a normed value may sit one step of the last bit away from the reference's.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """Row program_id of x [S, n]: x <- x + res (rounded) if HAS_RES; out <- w * rms_norm(x)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    at = row.to(tl.int64) * n + cols
    x = tl.load(x_ptr + at, mask=ok, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(x_ptr + at, x, mask=ok)
    h = x.to(tl.float32)
    mean = tl.sum(h * h, axis=0) / n
    r = tl.rsqrt(mean + eps)  # as torch.rsqrt on CUDA (an approximate reciprocal root)
    normed = (h * r).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (w * normed).to(x.dtype), mask=ok)


@triton.jit(do_not_specialize=["start", "s"])  # a step's position and length: one compile for all
def rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, start, k_ptr, v_ptr, q_ptr, s, qkv_stride,
                      heads, kv_heads, capacity, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                      POS_FROM_PTR: tl.constexpr):
    """Row program_id(0) of qkv [S, q + 2 kv], head program_id(1) of its heads + 2 kv_heads:
    a query head rotated into q [heads, S, HEAD_DIM], a key head rotated and a value head copied
    into the caches [kv_heads, capacity, HEAD_DIM] at position p + row. p is start, with the
    tables' rows starting at the first token (a slice); or, POS_FROM_PTR, the int64 at pos_ptr
    with the tables whole (a captured step, whose position lives on the device)."""
    row, head = tl.program_id(0), tl.program_id(1)
    half = tl.arange(0, BLOCK_HALF)  # the first half's places (BLOCK_HALF: a power of two >= them)
    ok = half < HEAD_DIM // 2
    if POS_FROM_PTR:
        p = tl.load(pos_ptr).to(tl.int64)
        table = (p + row) * HEAD_DIM
    else:
        p = tl.cast(start, tl.int64)
        table = row.to(tl.int64) * HEAD_DIM
    src = qkv_ptr + row.to(tl.int64) * qkv_stride + head * HEAD_DIM
    if head >= heads + kv_heads:  # a value head: copied as it is
        dst = v_ptr + ((head - heads - kv_heads).to(tl.int64) * capacity + p + row) * HEAD_DIM
        tl.store(dst + half, tl.load(src + half, mask=ok), mask=ok)
        tl.store(dst + HEAD_DIM // 2 + half, tl.load(src + HEAD_DIM // 2 + half, mask=ok), mask=ok)
    else:
        first, second = tl.load(src + half, mask=ok), tl.load(src + HEAD_DIM // 2 + half, mask=ok)
        dt = first.dtype
        x1, x2 = first.to(tl.float32), second.to(tl.float32)
        c1 = tl.load(cos_ptr + table + half, mask=ok).to(tl.float32)
        c2 = tl.load(cos_ptr + table + HEAD_DIM // 2 + half, mask=ok).to(tl.float32)
        s1 = tl.load(sin_ptr + table + half, mask=ok).to(tl.float32)
        s2 = tl.load(sin_ptr + table + HEAD_DIM // 2 + half, mask=ok).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product and sum rounded to dt as the torch ops round
        # them (a product of two bf16 or fp16 values is exact in fp32, so this is torch's product)
        lo = ((x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)).to(dt)
        hi = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        if head < heads:
            dst = q_ptr + (head.to(tl.int64) * s + row) * HEAD_DIM
        else:
            dst = k_ptr + ((head - heads).to(tl.int64) * capacity + p + row) * HEAD_DIM
        tl.store(dst + half, lo, mask=ok)
        tl.store(dst + HEAD_DIM // 2 + half, hi, mask=ok)

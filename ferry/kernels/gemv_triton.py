"""Triton kernels for products on quantized weights where they lie (`ferry.kernels.gemv` launches
them; this module imports Triton, so only that one imports this).

Both read the row format of `ferry.kernels.quant` in place and dequantize in registers, fp32
math rounded once to the activations' dtype (the reference's rounding), then multiply with
fp32 accumulation. A "pair" is two neighbouring values of a row: one int4 byte (low nibble
first) or two int8 bytes; the two share a group (groups are even).

- `rows_kernel`: out[m, r] = sum_c x[m, c] * w[r, c] for rows r of codes [R, C bits/8] with
  per-row group scales (and mins) [R, C / group]: qkv, o, gate and up rows, lm_head.
- `columns_kernel`: out[m, h] = sum_j z[m, j] * w[j, h] for neuron records' down columns
  [N, H bits/8], each neuron's scales (and mins) the row index[j] // group of the layer's down
  table [I / group, H]. Programs split the neurons too (`split`), writing fp32 partial sums.

One token (BLOCK_M == 1) reduces with elementwise products; several use `tl.dot` on 16+ rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pair_codes(codes_ptr, offsets, mask, BITS: tl.constexpr):
    """The two values of each pair at `offsets` (pair indices), as fp32."""
    if BITS == 4:
        b = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
        return (b & 15).to(tl.float32), (b >> 4).to(tl.float32)
    even = tl.load(codes_ptr + 2 * offsets, mask=mask, other=0).to(tl.float32)
    odd = tl.load(codes_ptr + 2 * offsets + 1, mask=mask, other=0).to(tl.float32)
    return even, odd


@triton.jit
def _dequant(q, scales_ptr, mins_ptr, offsets, mask, dtype, HAS_MINS: tl.constexpr):
    """w = q * scale (+ min) in fp32, rounded once to `dtype`; offsets index the group tables."""
    w = q * tl.load(scales_ptr + offsets, mask=mask, other=0).to(tl.float32)
    if HAS_MINS:
        w += tl.load(mins_ptr + offsets, mask=mask, other=0).to(tl.float32)
    return w.to(dtype)


@triton.jit
def rows_kernel(x_ptr, codes_ptr, scales_ptr, mins_ptr, out_ptr, M, R, PAIRS,
                stride_x, stride_codes, stride_scales, stride_out,
                GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MINS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ms = tl.arange(0, BLOCK_M)
    row_ok, m_ok = rows < R, ms < M
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for p0 in range(0, PAIRS, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P)
        p_ok = pairs < PAIRS
        mask = row_ok[:, None] & p_ok[None, :]
        q_even, q_odd = _pair_codes(codes_ptr + rows[:, None] * stride_codes, pairs[None, :], mask, BITS)
        table = rows[:, None] * stride_scales + (2 * pairs[None, :]) // GROUP
        w_even = _dequant(q_even, scales_ptr, mins_ptr, table, mask, dtype, HAS_MINS)
        w_odd = _dequant(q_odd, scales_ptr, mins_ptr, table, mask, dtype, HAS_MINS)
        xs = x_ptr + ms[:, None] * stride_x + 2 * pairs[None, :]
        x_mask = m_ok[:, None] & p_ok[None, :]
        x_even = tl.load(xs, mask=x_mask, other=0)
        x_odd = tl.load(xs + 1, mask=x_mask, other=0)
        if BLOCK_M == 1:
            part = w_even.to(tl.float32) * x_even.to(tl.float32) + w_odd.to(tl.float32) * x_odd.to(tl.float32)
            acc += tl.sum(part, axis=1)[None, :]
        else:
            acc += tl.dot(x_even, tl.trans(w_even), input_precision=PRECISION)
            acc += tl.dot(x_odd, tl.trans(w_odd), input_precision=PRECISION)
    out = out_ptr + ms[:, None] * stride_out + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def columns_kernel(z_ptr, codes_ptr, index_ptr, scales_ptr, mins_ptr, out_ptr, M, N, PAIRS, CHUNK,
                   stride_z, stride_codes, stride_index, stride_table, stride_split, stride_out,
                   GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MINS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # output columns 2p and 2p + 1
    first = tl.program_id(1) * CHUNK  # this program's neurons: first .. first + CHUNK - 1
    ms = tl.arange(0, BLOCK_M)
    p_ok, m_ok = pairs < PAIRS, ms < M
    dtype = z_ptr.dtype.element_ty
    acc_even = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for n0 in range(first, first + CHUNK, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = (ns < N) & (ns < first + CHUNK)
        mask = n_ok[:, None] & p_ok[None, :]
        q_even, q_odd = _pair_codes(codes_ptr + ns[:, None] * stride_codes, pairs[None, :], mask, BITS)
        groups = tl.load(index_ptr + ns * stride_index, mask=n_ok, other=0) // GROUP
        table = groups[:, None] * stride_table + 2 * pairs[None, :]
        w_even = _dequant(q_even, scales_ptr, mins_ptr, table, mask, dtype, HAS_MINS)
        w_odd = _dequant(q_odd, scales_ptr, mins_ptr, table + 1, mask, dtype, HAS_MINS)
        if BLOCK_M == 1:
            z = tl.load(z_ptr + ns, mask=n_ok, other=0).to(tl.float32)
            acc_even += tl.sum(z[:, None] * w_even.to(tl.float32), axis=0)[None, :]
            acc_odd += tl.sum(z[:, None] * w_odd.to(tl.float32), axis=0)[None, :]
        else:
            z = tl.load(z_ptr + ms[:, None] * stride_z + ns[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0)
            acc_even += tl.dot(z, w_even, input_precision=PRECISION)
            acc_odd += tl.dot(z, w_odd, input_precision=PRECISION)
    out = out_ptr + tl.program_id(1) * stride_split + ms[:, None] * stride_out + 2 * pairs[None, :]
    out_mask = m_ok[:, None] & p_ok[None, :]
    tl.store(out, acc_even, mask=out_mask)
    tl.store(out + 1, acc_odd, mask=out_mask)

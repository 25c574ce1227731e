"""Triton kernels for products on quantized weights where they lie (`ferry.kernels.gemv` launches
them; this module imports Triton, so only that one imports this).

Both read the row format of `ferry.kernels.quant` in place and dequantize in registers, fp32
math rounded once to the activations' dtype (the reference's rounding), then multiply with fp32
accumulation. A block of values is loaded whole: int8 codes as they are, int4 bytes split into
their nibbles and interleaved back into value order (low nibble first).

- `rows_kernel`: out[m, r] = sum_c x[m, c] * w[r, c] for rows r of codes [R, C bits/8] with
  per-row group scales (and mins) [R, C / group]: qkv, o, gate and up rows, lm_head.
  Records' gate and up rows go in one launch as two parts of each record (out [M, 2, R]).
- `columns_kernel`: out[m, h] = sum_j z[m, j] * w[j, h] for neuron records' down columns
  [N, H bits/8], each neuron's scales (and mins) the row index[j] // group of the layer's down
  table [I / group, H]. Programs split the neurons too, writing fp32 partial sums that
  `splits_kernel` adds up and rounds in one more launch. Given the
  gate and up products instead of z (GATED), it forms z = SiLU(gate) * up itself, rounded as
  the reference rounds it, with the CATS threshold: the MLP's activations need no launches.

One token (BLOCK_M == 1) multiplies elementwise into a 2-D accumulator reduced once at the end;
several use `tl.dot` on 16+ rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _values(row_ptrs, first, rows_ok, count, BITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Codes first..first+BLOCK_V-1 of each row (row_ptrs [rows, 1]) as fp32 [rows, BLOCK_V]."""
    if BITS == 4:
        pairs = first // 2 + tl.arange(0, BLOCK_V // 2)
        mask = rows_ok[:, None] & (pairs < count // 2)[None, :]
        b = tl.load(row_ptrs + pairs[None, :], mask=mask, other=0).to(tl.int32)
        return tl.interleave(b & 15, b >> 4).to(tl.float32)
    vals = first + tl.arange(0, BLOCK_V)
    mask = rows_ok[:, None] & (vals < count)[None, :]
    return tl.load(row_ptrs + vals[None, :], mask=mask, other=0).to(tl.float32)


@triton.jit
def _dequant(q, scales_ptr, mins_ptr, offsets, mask, dtype, HAS_MINS: tl.constexpr):
    """w = q * scale (+ min) in fp32, rounded once to `dtype`; offsets index the group tables."""
    w = q * tl.load(scales_ptr + offsets, mask=mask, other=0).to(tl.float32)
    if HAS_MINS:
        w += tl.load(mins_ptr + offsets, mask=mask, other=0).to(tl.float32)
    return w.to(dtype)


@triton.jit
def rows_kernel(x_ptr, codes_ptr, scales_ptr, mins_ptr, out_ptr, M, R, PARTS, C,
                stride_x, stride_codes, stride_part_codes, stride_scales, stride_part_scales, stride_out,
                GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MINS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # out's columns: part * R + record
    ms = tl.arange(0, BLOCK_M)
    row_ok, m_ok = rows < R * PARTS, ms < M
    record, part = (rows % R).to(tl.int64), (rows // R).to(tl.int64)  # int64: a large lm_head's offsets
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_one = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)  # one token: reduced after the loop
    at_codes = record * stride_codes + part * stride_part_codes
    at_scales = record * stride_scales + part * stride_part_scales
    for v0 in range(0, C, BLOCK_V):
        vals = v0 + tl.arange(0, BLOCK_V)
        v_ok = vals < C
        q = _values(codes_ptr + at_codes[:, None], v0, row_ok, C, BITS, BLOCK_V)
        table = at_scales[:, None] + vals[None, :] // GROUP
        w = _dequant(q, scales_ptr, mins_ptr, table, row_ok[:, None] & v_ok[None, :], dtype, HAS_MINS)
        x = tl.load(x_ptr + ms[:, None] * stride_x + vals[None, :], mask=m_ok[:, None] & v_ok[None, :], other=0)
        if BLOCK_M == 1:
            acc_one += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if BLOCK_M == 1:
        acc = tl.sum(acc_one, axis=1)[None, :]
    out = out_ptr + ms[:, None] * stride_out + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def _activations(z_ptr, offsets, mask, stride_up, threshold, GATED: tl.constexpr, HAS_THRESHOLD: tl.constexpr):
    """z at offsets; or, GATED, z = SiLU(gate) * up from the gate products at offsets and the up
    products stride_up further, each step rounded to their dtype as `reference.gated` rounds it
    (a CATS threshold, given in that dtype, zeroes SiLU values whose size is not at least it)."""
    if GATED:
        gate = tl.load(z_ptr + offsets, mask=mask, other=0)
        dt = gate.dtype
        g = gate.to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        if HAS_THRESHOLD:
            a = tl.where(tl.abs(a) >= threshold, a, a * 0.0)
        up = tl.load(z_ptr + stride_up + offsets, mask=mask, other=0).to(tl.float32)
        return (a * up).to(dt)
    return tl.load(z_ptr + offsets, mask=mask, other=0)


@triton.jit
def columns_kernel(z_ptr, codes_ptr, index_ptr, scales_ptr, mins_ptr, out_ptr, M, N, H, CHUNK,
                   stride_z, stride_up, threshold, stride_codes, stride_index, stride_table, stride_split,
                   stride_out, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MINS: tl.constexpr,
                   GATED: tl.constexpr, HAS_THRESHOLD: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    first_col = tl.program_id(0) * BLOCK_H
    cols = first_col + tl.arange(0, BLOCK_H)  # this program's output columns
    first = tl.program_id(1) * CHUNK  # and neurons: first .. first + CHUNK - 1
    ms = tl.arange(0, BLOCK_M)
    h_ok, m_ok = cols < H, ms < M
    dtype = z_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_one = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)  # one token: reduced after the loop
    for n0 in range(first, first + CHUNK, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = (ns < N) & (ns < first + CHUNK)
        wide = ns.to(tl.int64)
        q = _values(codes_ptr + wide[:, None] * stride_codes, first_col, n_ok, H, BITS, BLOCK_H)
        groups = (tl.load(index_ptr + wide * stride_index, mask=n_ok, other=0) // GROUP).to(tl.int64)
        table = groups[:, None] * stride_table + cols[None, :]
        w = _dequant(q, scales_ptr, mins_ptr, table, n_ok[:, None] & h_ok[None, :], dtype, HAS_MINS)
        if BLOCK_M == 1:
            z = _activations(z_ptr, ns, n_ok, stride_up, threshold, GATED, HAS_THRESHOLD).to(tl.float32)
            acc_one += z[:, None] * w.to(tl.float32)
        else:
            z = _activations(z_ptr, ms[:, None] * stride_z + ns[None, :], m_ok[:, None] & n_ok[None, :],
                             stride_up, threshold, GATED, HAS_THRESHOLD)
            acc += tl.dot(z, w, input_precision=PRECISION)
    if BLOCK_M == 1:
        acc = tl.sum(acc_one, axis=0)[None, :]
    out = out_ptr + tl.program_id(1) * stride_split + ms[:, None] * stride_out + cols[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & h_ok[None, :])


@triton.jit
def splits_kernel(partial_ptr, out_ptr, SPLIT, SIZE, BLOCK: tl.constexpr):
    """out = the sum over SPLIT partial results [SPLIT, SIZE] (fp32), rounded once to out's dtype:
    the columns kernel's neuron splits added up in one launch."""
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = at < SIZE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, SPLIT):
        acc += tl.load(partial_ptr + i * SIZE + at, mask=ok, other=0.0)
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)

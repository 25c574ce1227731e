"""Fused small ops of a one-token bf16 decode step on the CPU (numba): RMSNorm, with the residual
add before it, and rope on q and k with the KV cache writes.

A decode step of the default model spends about a third of its time outside the weight products,
in ops on a few hundred values each: every torch op costs 1-2 µs to dispatch however little it
computes, and RMSNorm is eight of them, rope with the two cache writes about ten. Each kernel
here is one call (about 2 µs) for the same work.

Numerics are the reference's (`ferry.kernels.reference`), rounding for rounding: bf16 values
widen to fp32, every product, sum and cast that the torch ops round to bf16 is rounded here to
bf16 too (nearest even), and fp32 steps stay fp32. Rope is bit for bit the reference's. Two
things differ, each at most one bf16 step and only for a value on a rounding boundary: RMSNorm's
mean of squares is summed in another order (fp64 here, rounded once to fp32), and SiLU's exp
comes from another library than torch's. (A NaN keeps its sign bit here; torch writes +NaN.)

The kernels take tensors by address, so the wrappers check what the kernels assume: dtype,
device, contiguity, sizes, and positions inside the cache.

Used by `ferry.model.forward` for one-token passes of one sequence on the CPU in bf16 (see
`usable`); everything else runs the torch ops.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# None: one-token bf16 passes on the CPU; False: never (the torch ops everywhere)
ENABLED: bool | None = None


def usable(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a pass over x [S, ...] takes these kernels: one row, bf16 on the CPU, and the other
    tensors it combines with (norm weights, caches, rope tables) bf16 too."""
    return (ENABLED is not False and x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and all(t.dtype == torch.bfloat16 for t in others))


@intrinsic
def _f32_bits(typingctx, value):
    """fp32 -> its bits as uint32 (a register reinterpretation, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, value):
    """uint32 bits -> the fp32 they encode."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@numba.njit(inline="always")
def _round(v) -> np.uint16:
    """fp32 value -> bf16 bits, nearest even (as torch's cast)."""
    u = _f32_bits(np.float32(v))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(inline="always")
def _value(b) -> np.float32:
    """bf16 bits -> fp32 value."""
    return _bits_f32(np.uint32(b) << np.uint32(16))


def _pointer(item):
    """An intrinsic taking an address (int) as a pointer to `item`s: how the kernels take tensors,
    whose numpy views cost more to make (about 1.3 µs each) than a kernel runs."""
    @intrinsic
    def cast(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
        return types.CPointer(item)(types.intp), codegen
    return cast


_u16_ptr, _i64_ptr = _pointer(types.uint16), _pointer(types.int64)


@numba.njit(inline="always")
def _at(address, n):
    """n bf16 values (their bits) at an address."""
    return numba.carray(_u16_ptr(address), n)


@numba.njit(cache=True)
def _add_rms_norm(x_at, y_at, weight_at, n, eps, out_at):
    """x <- x + y (bf16; skipped when y_at is 0), out <- rms_norm(x) * weight, all [n] bf16."""
    x, weight, out = _at(x_at, n), _at(weight_at, n), _at(out_at, n)
    h = np.empty(n, np.float32)
    total = 0.0
    if y_at:
        y = _at(y_at, n)
        for i in range(n):
            x[i] = _round(_value(x[i]) + _value(y[i]))
    for i in range(n):
        v = _value(x[i])
        h[i] = v
        total += np.float64(np.float32(v * v))
    r = np.float32(1.0) / np.sqrt(np.float32(np.float32(total / n) + np.float32(eps)))
    for i in range(n):
        out[i] = _round(_value(weight[i]) * _value(_round(h[i] * r)))


@numba.njit(cache=True)
def _rope_write(qkv_at, cos_at, sin_at, heads, kv_heads, head_dim, pos, capacity, k_at, v_at, q_at):
    """Rope on the query and key heads of one token's qkv [q + 2 kv] at one position (cos/sin
    [head_dim]); rotated queries into q [heads, head_dim], keys and values into the caches
    [kv_heads, capacity, head_dim] at pos."""
    qkv = _at(qkv_at, (heads + 2 * kv_heads) * head_dim)
    cos, sin, q = _at(cos_at, head_dim), _at(sin_at, head_dim), _at(q_at, heads * head_dim)
    k, v = _at(k_at, kv_heads * capacity * head_dim), _at(v_at, kv_heads * capacity * head_dim)
    half = head_dim // 2
    for head in range(heads + kv_heads):
        src = head * head_dim
        dst = src if head < heads else ((head - heads) * capacity + pos) * head_dim
        out = q if head < heads else k
        for i in range(half):
            x1, x2 = _value(qkv[src + i]), _value(qkv[src + half + i])
            out[dst + i] = _round(_value(_round(x1 * _value(cos[i]))) - _value(_round(x2 * _value(sin[i]))))
            out[dst + half + i] = _round(_value(_round(x2 * _value(cos[half + i])))
                                         + _value(_round(x1 * _value(sin[half + i]))))
    src = (heads + kv_heads) * head_dim
    for head in range(kv_heads):
        dst = (head * capacity + pos) * head_dim
        for i in range(head_dim):
            v[dst + i] = qkv[src + head * head_dim + i]


@numba.njit(cache=True)
def _gated_scatter(gate_at, up_at, rows, index_at, has_threshold, threshold, spread_at, width):
    """The MLP's activations spread to checkpoint places: spread [width] <- 0, then for j < rows,
    spread[index[j]] = SiLU(gate[j]) * up[j] (bf16; with a threshold, a SiLU value whose size is
    not at least the threshold counts 0, as the reference's comparison drops it, NaN included)."""
    gate, up, spread = _at(gate_at, rows), _at(up_at, rows), _at(spread_at, width)
    index = numba.carray(_i64_ptr(index_at), rows)
    threshold = _value(_round(threshold))  # torch compares bf16 with the scalar rounded to bf16
    for i in range(width):
        spread[i] = 0
    inside = True
    for j in range(rows):
        g = _value(gate[j])
        a = _value(_round(g / (np.float32(1.0) + np.exp(-g))))
        if has_threshold and not abs(a) >= threshold:
            a = a * np.float32(0.0)
        if 0 <= index[j] < width:
            spread[index[j]] = _round(a * _value(up[j]))
        else:
            inside = False
    return inside


def _address(t: torch.Tensor, numel: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """A tensor's address for a kernel that reads or writes `numel` of its values."""
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(f"the fused decode kernels take contiguous CPU {dtype} tensors of {numel} values "
                         f"(got {t.dtype}, {t.device.type}, shape {tuple(t.shape)})")
    return t.data_ptr()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.rms_norm(x + residual)` for one bf16 row x [1, H]; with a residual, x is
    updated in place to x + residual (the caller's residual stream) and must be its own tensor."""
    n = weight.numel()
    out = torch.empty_like(x)
    _add_rms_norm(_address(x, n), 0 if residual is None else _address(residual, n), _address(weight, n), n,
                  eps, out.data_ptr())
    return out


def rope_write(cfg, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, pos: int) -> torch.Tensor:
    """One token's qkv [1, q + 2 kv] at position pos (cos/sin: the tables' row for it, [1,
    head_dim]): keys (rotated) and values written into the caches [(1,) kv_heads, L, head_dim]
    at pos; the rotated queries [heads, 1, head_dim]."""
    heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    capacity = k_cache.shape[-2]
    if not 0 <= pos < capacity or k_cache.shape[-3:] != (kv_heads, capacity, d):  # a leading 1: numel is checked
        raise ValueError(f"position {pos} outside a cache of {capacity}, or a cache not [(1,) {kv_heads}, L, {d}]")
    cache = kv_heads * capacity * d
    q = torch.empty(heads, 1, d, dtype=qkv.dtype)
    _rope_write(_address(qkv, (heads + 2 * kv_heads) * d), _address(cos, d), _address(sin, d), heads, kv_heads, d,
                pos, capacity, _address(k_cache, cache), _address(v_cache, cache), q.data_ptr())
    return q


def gated_scatter(gate: torch.Tensor, up: torch.Tensor, rows: int, index: torch.Tensor,
                  threshold: float | None, width: int) -> torch.Tensor:
    """One token's gate and up products [1, n >= rows] into z = SiLU(gate) * up (`reference.gated`)
    for the first `rows` neurons, each at its checkpoint place `index` (int64, places < width)
    in a zero row [1, width]: what the packed MLP's down product over checkpoint order multiplies."""
    n = gate.shape[-1]
    if not rows <= min(n, index.numel(), width):
        raise ValueError(f"gated_scatter: {rows} neurons from {n} products, {index.numel()} places, a row of {width}")
    spread = torch.empty(1, width, dtype=gate.dtype)
    if not _gated_scatter(_address(gate, n), _address(up, n), rows, _address(index, index.numel(), torch.int64),
                          threshold is not None, 0.0 if threshold is None else threshold, spread.data_ptr(), width):
        raise ValueError(f"gated_scatter: a checkpoint place outside the row of {width}")
    return spread

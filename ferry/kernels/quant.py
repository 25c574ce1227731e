"""Group-wise symmetric weight quantization: int8 and int4 rows with one fp16 scale per group.

Format of one row of C values split into groups of g consecutive values (g divides C):

- int8: C bytes, two's complement q in [-127, 127];
- int4: C / 2 bytes; value 2j sits in the low nibble of byte j and value 2j + 1 in the high
  nibble, each stored as q + 8 with q in [-7, 7] (so 0x88 holds two zeros);
- scales: C / g fp16 values; w is approximated by q * scale of its group.

A group's scale is max|w| / qmax rounded *up* to the next fp16 value, so w / scale never leaves
[-qmax, qmax] and the error of every weight is at most scale / 2 (a scale rounded down would
clip the largest weight). Symmetric scales need no zero point, so a row dequantizes with one
multiply per value.

`dequantize_reference` is the plain definition; `dequantize_into` is the torch path (in place,
no allocation); `dequantize_numba` is one fused pass on the CPU (tested bit for bit against the
reference). `dequantize` picks the backend once per device and dtype, with `BACKEND` as the
override for tests and benchmarks.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ferry.kernels.threads import run_parallel

QMAX = {8: 127, 4: 7}
BACKEND: str | None = None  # None: automatic; "torch" or "numba" forces one


def quantize_rows(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] (any float dtype) -> codes uint8 [R, C * bits / 8], scales fp16 [R, C / group]."""
    r, c = w.shape
    qmax = QMAX[bits]
    x = w.float().view(r, c // group, group)
    scales = (x.abs().amax(-1) / qmax).to(torch.float16)
    low = scales.float() < x.abs().amax(-1) / qmax
    scales = torch.where(low, (scales.view(torch.int16) + 1).view(torch.float16), scales)
    if not torch.isfinite(scales).all():
        raise ValueError("a weight is too large for fp16 scales")
    divisor = torch.where(scales == 0, 1.0, scales.float())[..., None]
    q = torch.round(x / divisor).clamp_(-qmax, qmax).to(torch.int8).view(r, c)
    if bits == 8:
        return q.view(torch.uint8), scales
    nib = (q + 8).to(torch.uint8).view(r, c // 2, 2)
    return nib[..., 0] | (nib[..., 1] << 4), scales


def unpack_int4_reference(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., C/2] -> q int8 [..., C], by the format above (low nibble first)."""
    low = (codes & 0x0F).to(torch.int8) - 8
    high = (codes >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., Cb], scales fp16 [..., G] -> weights [..., C] in dtype (fp32 product, one rounding)."""
    q = codes.view(torch.int8) if bits == 8 else unpack_int4_reference(codes)
    groups = scales.shape[-1]
    x = q.float().unflatten(-1, (groups, -1)) * scales.float()[..., None]
    return x.flatten(-2).to(dtype)


def dequantize_into(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """The torch path: out [..., C] = dequantized codes, written in place without temporaries.

    Products are formed in fp32 (bf16/fp16 times fp16 promotes) and rounded once into out, so
    this equals `dequantize_reference` exactly. Works on strided views (MLP records)."""
    groups = scales.shape[-1]
    if bits == 8:
        out.copy_(codes.view(torch.int8))
    else:
        pairs = out.unflatten(-1, (-1, 2))  # [..., C/2, 2]
        low, high = pairs[..., 0], pairs[..., 1]
        high.copy_(codes).div_(16, rounding_mode="floor")  # byte values are exact in bf16/fp16
        low.copy_(codes).add_(high, alpha=-16).sub_(8)
        high.sub_(8)
    out.unflatten(-1, (groups, -1)).mul_(scales[..., None])
    return out


@numba.njit(inline="always")
def _half(h: int) -> float:
    """fp16 bits -> value (numba has no float16 on the CPU)."""
    exp, mant = (h >> 10) & 0x1F, h & 0x3FF
    v = mant * 2.0 ** -24 if exp == 0 else (1024 + mant) * 2.0 ** (exp - 25)
    return -v if h & 0x8000 else v


@numba.njit(inline="always")
def _row(codes, scales, bits: int, group: int, tmp) -> None:
    """One row's fp32 values into tmp."""
    for gi in range(scales.shape[0]):
        s = np.float32(_half(scales[gi]))
        base = gi * group
        if bits == 8:
            for c in range(base, base + group):
                q = np.int32(codes[c])
                tmp[c] = np.float32(q - 256 if q > 127 else q) * s
        else:
            for j in range(base // 2, (base + group) // 2):
                b = np.int32(codes[j])
                tmp[2 * j] = np.float32((b & 15) - 8) * s
                tmp[2 * j + 1] = np.float32((b >> 4) - 8) * s


@numba.njit(inline="always")
def _bf16_item(codes, scales, bits, group, out, i):
    """Item i of [N, M] rows: fp32 products rounded to bf16 bits (nearest even, like torch's cast).

    The products go through a row-sized scratch (from numba's allocator pool): the two simple
    loops vectorize, and measured faster than rounding each product where it is formed."""
    n, r = i // out.shape[1], i % out.shape[1]
    tmp = np.empty(out.shape[2], np.float32)
    _row(codes[n, r], scales[n, r], bits, group, tmp)
    u = tmp.view(np.uint32)
    for c in range(out.shape[2]):
        b = u[c]
        out[n, r, c] = np.uint16((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16)


@numba.njit(inline="always")
def _f32_item(codes, scales, bits, group, out, i):
    n, r = i // out.shape[1], i % out.shape[1]
    _row(codes[n, r], scales[n, r], bits, group, out[n, r])


# codes [N, M, Cb] u8, scales [N, M, G] u16 (fp16 bits), out [N, M, C] (u16 bf16 bits or f32).
# Small tensors run on one thread: waking the pool costs more than the work.
@numba.njit(parallel=True, cache=True)
def _bf16_parallel(codes, scales, bits, group, out):
    for i in numba.prange(out.shape[0] * out.shape[1]):
        _bf16_item(codes, scales, bits, group, out, i)


@numba.njit(cache=True)
def _bf16_serial(codes, scales, bits, group, out):
    for i in range(out.shape[0] * out.shape[1]):
        _bf16_item(codes, scales, bits, group, out, i)


@numba.njit(parallel=True, cache=True)
def _f32_parallel(codes, scales, bits, group, out):
    for i in numba.prange(out.shape[0] * out.shape[1]):
        _f32_item(codes, scales, bits, group, out, i)


@numba.njit(cache=True)
def _f32_serial(codes, scales, bits, group, out):
    for i in range(out.shape[0] * out.shape[1]):
        _f32_item(codes, scales, bits, group, out, i)


PARALLEL_MIN_VALUES = 1 << 16
_KERNELS = {("bf16", True): _bf16_parallel, ("bf16", False): _bf16_serial,
            ("f32", True): _f32_parallel, ("f32", False): _f32_serial}


def _np3(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """A 2-D or 3-D CPU tensor as a 3-D numpy array (strided views stay views, no copy)."""
    t = t.view(dtype) if dtype is not None else t
    return (t if t.dim() == 3 else t.unsqueeze(0)).numpy()


def dequantize_numba(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """One fused pass on the CPU for bf16 or fp32 out; the same values as the reference."""
    group = out.shape[-1] // scales.shape[-1]
    c, s = _np3(codes), _np3(scales, torch.int16).view(np.uint16)
    parallel = out.numel() >= PARALLEL_MIN_VALUES
    dst = _np3(out, torch.int16).view(np.uint16) if out.dtype == torch.bfloat16 else _np3(out)
    kernel = _KERNELS["bf16" if out.dtype == torch.bfloat16 else "f32", parallel]
    if parallel:
        run_parallel(kernel, c, s, bits, group, dst)
    else:
        kernel(c, s, bits, group, dst)
    return out


def pick_backend(device: torch.device, dtype: torch.dtype) -> str:
    if BACKEND is not None:
        return BACKEND
    return "numba" if device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) else "torch"


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "numba":
        return dequantize_numba(codes, scales, bits, out)
    return dequantize_into(codes, scales, bits, out)

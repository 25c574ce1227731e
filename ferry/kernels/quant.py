"""Group-wise weight quantization: asymmetric int4 and symmetric int8 rows, fitted scales.

Format of one row of C values split into groups of g consecutive values (g divides C):

- int4: codes [C / 2] uint8; value 2j sits in the low nibble of byte j and value 2j + 1 in the
  high nibble, each an unsigned q in [0, 15]; scales [C / g] fp16 and mins [C / g] fp16;
  w = q * scale + min of its group. This is GGUF Q4_1's arithmetic, and Q4_0, Q4_K, AWQ and
  GPTQ map onto it (see `Grouped`).
- int8: codes [C] int8 (two's complement, q in [-127, 127]); scales [C / g] fp16; w = q * scale.
  GGUF Q8_0 is exactly this with g = 32.

Dequantization forms q * scale (+ min) in fp32 and rounds once to the target dtype.

`Grouped` is the unpacked, source-neutral form every importer produces (one q per byte), and
`ferry.kernels.quant_fit` is ferry's own quantizer.

`dequantize_reference` is the plain definition; `dequantize_into` is the torch path (fp32
temporaries);
`dequantize_numba` is one fused pass on the CPU (tested bit for bit against the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from ferry.kernels.threads import run_parallel

QMAX = {8: 127, 4: 15}  # int8: q in [-127, 127]; int4: q in [0, 15]
BACKEND: str | None = None  # None: automatic; "torch" or "numba" forces one


@dataclass(frozen=True)
class Grouped:
    """A matrix [R, C] quantized in groups along C: w[r, c] = q[r, c] * scale[r, c // g]
    (+ minimum[r, c // g] for int4). Every source format is brought to this form first.

    q: int4, uint8 values in [0, 15]; int8, int8 values in [-127, 127] (-128 is refused).
    scale, minimum: fp16 [R, C / g]; minimum is None exactly when bits == 8.
    """

    q: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None
    bits: int

    def __post_init__(self) -> None:
        r, c = self.q.shape
        if self.bits not in QMAX or (self.minimum is None) != (self.bits == 8):
            raise ValueError(f"int{self.bits} groups {'need' if self.bits == 4 else 'have no'} minimums")
        if self.scale.dtype != torch.float16 or self.scale.dim() != 2 or self.scale.shape[0] != r \
                or c % max(1, self.scale.shape[1]):
            raise ValueError(f"scales {tuple(self.scale.shape)} {self.scale.dtype} do not fit q {tuple(self.q.shape)}")
        if self.minimum is not None and (self.minimum.shape != self.scale.shape or self.minimum.dtype != torch.float16):
            raise ValueError("minimums must be fp16 of the scales' shape")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = self.q.float().unflatten(-1, (self.scale.shape[1], -1)) * self.scale.float()[..., None]
        if self.minimum is not None:
            x = x + self.minimum.float()[..., None]
        return x.flatten(-2).to(dtype)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes uint8 [R, C * bits / 8], scales, mins) in the row format above."""
        if self.bits == 8:
            return self.q.view(torch.uint8), self.scale, None
        return pack_int4(self.q), self.scale, self.minimum

    def rows(self, index) -> "Grouped":
        pick = (lambda t: None if t is None else t[index])
        return Grouped(self.q[index], self.scale[index], pick(self.minimum), self.bits)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [..., C] in [0, 15] -> codes [..., C / 2], low nibble first."""
    pairs = q.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., C / 2] -> q uint8 [..., C] in [0, 15] (low nibble first)."""
    return torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)


# --- dequantization ----------------------------------------------------------------------------
def dequantize_reference(codes, scales, mins, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., Cb], scales/mins fp16 [..., G] -> weights [..., C] (fp32 math, one rounding)."""
    q = codes.view(torch.int8) if bits == 8 else unpack_int4(codes)
    x = q.float().unflatten(-1, (scales.shape[-1], -1)) * scales.float()[..., None]
    if mins is not None:
        x = x + mins.float()[..., None]
    return x.flatten(-2).to(dtype)


def dequantize_into(codes, scales, mins, bits: int, out: torch.Tensor) -> torch.Tensor:
    """The torch path, on any device: out [..., C] = the reference's values.

    The math runs in fp32 temporaries the size of `out` (rounding q * scale + min once, as the
    reference does: with a min, rounding the product first would cost up to half an ulp of the
    product, not of the weight). Works on strided views (records)."""
    out.copy_(dequantize_reference(codes, scales, mins, bits, torch.float32))
    return out


@numba.njit(inline="always")
def _half(h: int) -> float:
    """fp16 bits -> value (numba has no float16 on the CPU)."""
    exp, mant = (h >> 10) & 0x1F, h & 0x3FF
    v = mant * 2.0 ** -24 if exp == 0 else (1024 + mant) * 2.0 ** (exp - 25)
    return -v if h & 0x8000 else v


@numba.njit(inline="always")
def _row(codes, scales, mins, bits: int, group: int, tmp) -> None:
    """One row's fp32 values into tmp (mins is ignored for int8)."""
    for gi in range(scales.shape[0]):
        s = np.float32(_half(scales[gi]))
        base = gi * group
        if bits == 8:
            for c in range(base, base + group):
                q = np.int32(codes[c])
                tmp[c] = np.float32(q - 256 if q > 127 else q) * s
        else:
            m = np.float32(_half(mins[gi]))
            for j in range(base // 2, (base + group) // 2):
                b = np.int32(codes[j])
                tmp[2 * j] = np.float32(b & 15) * s + m
                tmp[2 * j + 1] = np.float32(b >> 4) * s + m


@numba.njit(inline="always")
def _bf16_item(codes, scales, mins, bits, group, out, i):
    """Item i of [N, M] rows: fp32 values rounded to bf16 bits (nearest even, like torch's cast).

    The values go through a row-sized scratch (from numba's allocator pool): the two simple
    loops vectorize, and measured faster than rounding each value where it is formed."""
    n, r = i // out.shape[1], i % out.shape[1]
    tmp = np.empty(out.shape[2], np.float32)
    _row(codes[n, r], scales[n, r], mins[n, r], bits, group, tmp)
    u = tmp.view(np.uint32)
    for c in range(out.shape[2]):
        b = u[c]
        out[n, r, c] = np.uint16((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16)


@numba.njit(inline="always")
def _f32_item(codes, scales, mins, bits, group, out, i):
    n, r = i // out.shape[1], i % out.shape[1]
    _row(codes[n, r], scales[n, r], mins[n, r], bits, group, out[n, r])


# codes [N, M, Cb] u8, scales/mins [N, M, G] u16 (fp16 bits), out [N, M, C] (u16 bf16 bits or
# f32). Small tensors run on one thread: waking the pool costs more than the work.
@numba.njit(parallel=True, cache=True)
def _bf16_parallel(codes, scales, mins, bits, group, out):
    for i in numba.prange(out.shape[0] * out.shape[1]):
        _bf16_item(codes, scales, mins, bits, group, out, i)


@numba.njit(cache=True)
def _bf16_serial(codes, scales, mins, bits, group, out):
    for i in range(out.shape[0] * out.shape[1]):
        _bf16_item(codes, scales, mins, bits, group, out, i)


@numba.njit(parallel=True, cache=True)
def _f32_parallel(codes, scales, mins, bits, group, out):
    for i in numba.prange(out.shape[0] * out.shape[1]):
        _f32_item(codes, scales, mins, bits, group, out, i)


@numba.njit(cache=True)
def _f32_serial(codes, scales, mins, bits, group, out):
    for i in range(out.shape[0] * out.shape[1]):
        _f32_item(codes, scales, mins, bits, group, out, i)


PARALLEL_MIN_VALUES = 1 << 16
_KERNELS = {("bf16", True): _bf16_parallel, ("bf16", False): _bf16_serial,
            ("f32", True): _f32_parallel, ("f32", False): _f32_serial}


def np3(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """A 2-D or 3-D CPU tensor as a 3-D numpy array (strided views stay views, no copy)."""
    t = t.view(dtype) if dtype is not None else t
    return (t if t.dim() == 3 else t.unsqueeze(0)).numpy()


def fp16_bits(t: torch.Tensor) -> np.ndarray:
    return np3(t, torch.int16).view(np.uint16)


def dequantize_numba(codes, scales, mins, bits: int, out: torch.Tensor) -> torch.Tensor:
    """One fused pass on the CPU for bf16 or fp32 out; the same values as the reference."""
    group = out.shape[-1] // scales.shape[-1]
    c, s = np3(codes), fp16_bits(scales)
    m = s if mins is None else fp16_bits(mins)  # int8 ignores it
    parallel = out.numel() >= PARALLEL_MIN_VALUES
    dst = np3(out, torch.int16).view(np.uint16) if out.dtype == torch.bfloat16 else np3(out)
    kernel = _KERNELS["bf16" if out.dtype == torch.bfloat16 else "f32", parallel]
    if parallel:
        run_parallel(kernel, c, s, m, bits, group, dst)
    else:
        kernel(c, s, m, bits, group, dst)
    return out


def pick_backend(device: torch.device, dtype: torch.dtype) -> str:
    if BACKEND is not None:
        return BACKEND
    return "numba" if device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) else "torch"


def dequantize(codes, scales, mins, bits: int, out: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "numba":
        return dequantize_numba(codes, scales, mins, bits, out)
    return dequantize_into(codes, scales, mins, bits, out)

"""GGUF quantized blocks -> `Grouped` (groups of 32 along each row), without dequantizing.

A GGUF tensor's data, as `gguf.GGUFReader` gives it, is uint8 [rows, bytes per row]: each row is
a run of fixed-size blocks. The types whose arithmetic is ferry's (w = q * scale (+ min) per 32
values) are read as they are stored:

- Q4_0, 18 bytes per 32 values: fp16 d, 16 bytes of nibbles; w = (q - 8) * d.
  Kept as scale d, min -8d: exact (-8d is a power-of-two multiple) unless -8d overflows fp16.
- Q4_1, 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles; w = q * d + m. Exact.
- Q8_0, 34 bytes: fp16 d, 32 int8; w = q * d. Exact (int8 groups).
  In these three, byte j's low nibble is value j and its high nibble value j + 16.
- Q4_K, 144 bytes per 256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales sc and
  mins mn (8 of each), 128 bytes of nibbles; w = q * (d * sc) - dmin * mn per 32 values. Byte
  32k + j holds value j of sub-block 2k (low nibble) and of sub-block 2k + 1 (high nibble).
  d * sc and dmin * mn need up to 17 bits and are rounded to fp16 here: the one inexact case,
  by at most half an fp16 ulp of the scale (times q) and of the min.

Every other type gives None: the caller dequantizes it.
"""

from __future__ import annotations

import numpy as np
import torch

from ferry.kernels.quant import Grouped

GROUP = 32
Q4_K_BYTES = 144  # per super-block of 256 values


def _half(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of every block [..., nbytes] -> fp32 [...]."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def _blocks(data: np.ndarray, nbytes: int) -> np.ndarray:
    """data uint8 [rows, bytes per row] -> [rows, blocks per row, nbytes]."""
    if data.ndim != 2 or data.dtype != np.uint8 or data.shape[1] % nbytes:
        raise ValueError(f"GGUF block data must be uint8 [rows, k * {nbytes}], got {data.dtype} {data.shape}")
    return data.reshape(data.shape[0], -1, nbytes)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs [..., n] -> q [..., 2n]: all low nibbles, then all high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fp16(x: np.ndarray) -> torch.Tensor | None:
    """fp32 [rows, groups] -> fp16, or None when a value overflows fp16."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    return torch.from_numpy(h) if np.isfinite(h).all() else None


def _int4(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> Grouped | None:
    rows = q.shape[0]
    s, m = _fp16(scale.reshape(rows, -1)), _fp16(minimum.reshape(rows, -1))
    if s is None or m is None:
        return None
    return Grouped(torch.from_numpy(np.ascontiguousarray(q.reshape(rows, -1))), s, m, 4)


def q4_0(data: np.ndarray) -> Grouped | None:
    b = _blocks(data, 18)
    d = _half(b, 0)
    return _int4(_nibbles(b[..., 2:]), d, -8 * d)


def q4_1(data: np.ndarray) -> Grouped | None:
    b = _blocks(data, 20)
    return _int4(_nibbles(b[..., 4:]), _half(b, 0), _half(b, 2))


def q8_0(data: np.ndarray) -> Grouped | None:
    b = _blocks(data, 34)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(b.shape[0], -1)
    if (q == -128).any():
        return None  # ferry's int8 groups are symmetric; llama.cpp never writes -128
    scale = _fp16(_half(b, 0))
    return None if scale is None else Grouped(torch.from_numpy(q), scale, None, 8)


def q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes [..., 12] -> 6-bit (sc, mn), each [..., 8].

    Bytes 0-3: sc 0-3 in the low 6 bits, the top 2 bits of sc 4-7; bytes 4-7: the same for mn;
    bytes 8-11: the low 4 bits of sc 4-7 (low nibble) and of mn 4-7 (high nibble).
    """
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def q4_k(data: np.ndarray) -> Grouped | None:
    b = _blocks(data, Q4_K_BYTES)
    rows, n = b.shape[:2]
    sc, mn = q4_k_scales(b[..., 4:16])
    scale = _half(b, 0)[..., None] * sc  # [rows, n, 8], exact in fp32
    minimum = -(_half(b, 2)[..., None] * mn)
    qs = b[..., 16:].reshape(rows, n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3)  # [rows, n, 4, 2, 32]: sub-blocks 2k, 2k + 1
    return _int4(q, scale, minimum)


READERS = {"Q4_0": q4_0, "Q4_1": q4_1, "Q4_K": q4_k, "Q8_0": q8_0}
KEPT = tuple(READERS)  # the GGUF types a conversion keeps as stored


def grouped(data: np.ndarray, qtype) -> Grouped | None:
    """The `Grouped` form of a GGUF matrix's raw data, or None for a type ferry dequantizes.

    qtype: a gguf.GGMLQuantizationType or its name. None also when a scale or min overflows fp16
    (Q4_0's -8d, Q4_K's d * sc) or a Q8_0 code is -128: the caller dequantizes those too."""
    read = READERS.get(getattr(qtype, "name", qtype))
    return None if read is None else read(np.asarray(data))

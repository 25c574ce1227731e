"""Matrix products on packed 4-bit weights: torch's CPU weight-only int4 kernel, fed ferry's groups.

`torch._weight_int4pack_mm_for_cpu(x, packed, group, table)` computes x @ Wᵀ for W [N, K] stored
as 4-bit codes q with, per group of `group` values along K, a scale and a zero:
w = (q - 8) * scale + zero. It reads the codes once and dequantizes in registers: at the default
model's shapes it runs 2-4x faster than a bf16 `F.linear` over the same matrix, and far faster
than dequantizing into a buffer first. Its constraints: N a multiple of 16, group 32/64/128/256,
and `table` [K / group, N, 2] contiguous in x's dtype. Only bf16 activations take its fast path;
fp32 is correct but slow (tests use it to compare with the reference exactly).

ferry's groups map onto it without loss of the codes:

- int4 (w = q * s + m): zero = m + 8 s.
- int8 (w = c * s, c in [-127, 127]): u = c + 128 splits into two nibbles, u = 16 hi + lo, so
  w = 16 s hi + s lo - 128 s: two int4 matrices whose products add up (hi: scale 16 s, zero 0;
  lo: scale s, zero 8 s). They read the same bytes as the int8 codes.

Packed layout (checked against torch's own packing by `layout_matches`): rows in blocks of 64;
byte [k, i] of block b holds row 64 b + i (low nibble) and row 64 b + 32 + i (high nibble) at
column k. A prefix of whole blocks is therefore a byte prefix, which is what a sparse step over
the first neurons uses. `permute_rows` reorders rows packed to packed (Griffin's reorder, once per
prompt), and `move_rows_` in place when few rows move; `pack(unpack(packed)[order])` is their
reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np
import torch

from ferry.kernels.threads import run_parallel

GROUPS = (32, 64, 128, 256)
BLOCK = 64  # rows per packed block


@dataclass(frozen=True)
class Int4Matrix:
    """W [n, k] for the int4 kernel: packed codes [n, k / 2] uint8 and table [k / group, n, 2]."""

    packed: torch.Tensor
    table: torch.Tensor
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], 2 * self.packed.shape[1]

    def prefix(self, rows: int) -> "Int4Matrix":
        """Rows 0..rows-1 (a whole number of blocks): a view of the codes, a copy of the table."""
        if rows % BLOCK and rows != self.shape[0]:
            raise ValueError(f"a prefix of {rows} rows is not whole blocks of {BLOCK}")
        return Int4Matrix(self.packed[:rows], self.table[:, :rows].contiguous(), self.group)


def supported(n: int, k: int, group: int, device: torch.device, reordered: bool = False) -> bool:
    """Whether the kernel takes W [n, k] at this group on this device (reordered: its rows will be
    permuted, which needs whole blocks)."""
    return (device.type == "cpu" and group in GROUPS and k % group == 0 and n % 16 == 0
            and (not reordered or n % BLOCK == 0) and layout_matches())


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (uint8 values 0..15, N a multiple of 64) into the kernel's layout [N, K / 2]."""
    n, k = codes.shape
    blocks = codes.view(n // BLOCK, 2, BLOCK // 2, k).transpose(2, 3)  # [B, 2, K, 32]
    return (blocks[:, 0] | (blocks[:, 1] << 4)).contiguous().view(n, k // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: codes [N, K] uint8."""
    n, half = packed.shape
    blocks = packed.view(n // BLOCK, half * 2, BLOCK // 2)  # [B, K, 32]
    both = torch.stack([blocks & 15, blocks >> 4], dim=1)  # [B, 2, K, 32]
    return both.transpose(2, 3).reshape(n, half * 2)


def pack_any(codes: torch.Tensor) -> torch.Tensor:
    """Like `pack` for any N that is a multiple of 16 (torch's packing handles partial blocks)."""
    if codes.shape[0] % BLOCK == 0:
        return pack(codes)
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)


def permute_rows(packed: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows `order` of packed codes [N, K / 2] (N a multiple of 64), as a new packed tensor: what
    `pack(unpack(packed)[order])` gives, in one pass over the bytes with no [N, K] temporaries.
    (At Llama-3-8B's gate, 14336 x 4096, that path takes about 95 ms on 2 cores.)"""
    n = _check_rows("permute_rows", packed, order)
    index = order.to(torch.int64).numpy()
    if n and not (0 <= index.min() and index.max() < n):
        raise ValueError(f"permute_rows: a row index outside 0..{n - 1}")
    out = torch.empty_like(packed)
    run_parallel(_permute_blocks, _blocks(packed), index, _blocks(out))
    return out


def _check_rows(name: str, packed: torch.Tensor, order: torch.Tensor) -> int:
    """What the row kernels assume of packed codes and an order of their rows; the row count."""
    n = packed.shape[0]
    if n % BLOCK or order.shape != (n,) or packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError(f"{name}: contiguous uint8 codes of whole {BLOCK}-row blocks and one index a row "
                         f"(got {tuple(packed.shape)} {packed.dtype}, order {tuple(order.shape)})")
    return n


def _blocks(packed: torch.Tensor) -> np.ndarray:
    """The codes as the kernels index them: [blocks, K, 32] bytes."""
    return packed.numpy().reshape(packed.shape[0] // BLOCK, packed.shape[1] * 2, BLOCK // 2)


@numba.njit(parallel=True, cache=True)
def _permute_blocks(src: np.ndarray, order: np.ndarray, out: np.ndarray) -> None:
    """out's block b, byte [k, i]: row order[64 b + i] (low nibble) and row order[64 b + 32 + i]
    (high) at column k; a row r lives in block r // 64, lane r % 32, nibble (r % 64) // 32."""
    columns, lanes = src.shape[1], src.shape[2]
    flat = src.reshape(-1)
    for b in numba.prange(out.shape[0]):
        rows = order[b * 2 * lanes:(b + 1) * 2 * lanes]
        at = (rows // (2 * lanes)) * columns * lanes + rows % lanes  # the row's byte at column 0
        shift = 4 * ((rows % (2 * lanes)) // lanes)
        for k in range(columns):
            for i in range(lanes):
                lo = (flat[at[i]] >> shift[i]) & 15
                hi = (flat[at[lanes + i]] >> shift[lanes + i]) & 15
                out[b, k, i] = lo | (hi << 4)
            at += lanes


def move_rows_(packed: torch.Tensor, order: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """In place, what `permute_rows(packed, order)` gives when `order` moves only the rows
    `places` (ascending, as `gather.moved_rows` finds them): work in proportion to the moved
    rows, for a reorder that changes few (at 8B's gate, 10% of the rows: 6 ms against 14)."""
    n = _check_rows("move_rows_", packed, order)
    sources = order.to(torch.int64)[places]
    if places.numel() and not (0 <= int(places[0]) and int(places[-1]) < n and bool((places[1:] > places[:-1]).all())
                               and torch.equal(sources.sort().values, places)):
        raise ValueError("move_rows_: `places` must be ascending rows that `order` maps among themselves")
    codes = _blocks(packed)
    held = np.empty((places.numel(), codes.shape[1]), np.uint8)
    run_parallel(_read_rows, codes, sources.numpy(), held)
    bounds = torch.searchsorted(places, torch.arange(0, n + BLOCK, BLOCK)).unique_consecutive()  # by block
    run_parallel(_write_rows, codes, places.to(torch.int64).numpy(), held, bounds.numpy())
    return packed


@numba.njit(parallel=True, cache=True)
def _read_rows(src: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[j] <- the codes of row rows[j], one a column."""
    lanes = src.shape[2]
    for j in numba.prange(rows.shape[0]):
        r = rows[j]
        b, lane, shift = r // (2 * lanes), r % lanes, 4 * ((r % (2 * lanes)) // lanes)
        for k in range(src.shape[1]):
            out[j, k] = (src[b, k, lane] >> shift) & 15


@numba.njit(parallel=True, cache=True)
def _write_rows(dst: np.ndarray, rows: np.ndarray, codes: np.ndarray, bounds: np.ndarray) -> None:
    """Row rows[j] <- codes[j]. `bounds` splits rows by block, so each thread owns whole blocks:
    the two nibbles of a byte are two rows of one block."""
    lanes = dst.shape[2]
    for t in numba.prange(bounds.shape[0] - 1):
        for j in range(bounds[t], bounds[t + 1]):
            r = rows[j]
            b, lane, shift = r // (2 * lanes), r % lanes, 4 * ((r % (2 * lanes)) // lanes)
            keep = np.uint8(0xF0) if shift == 0 else np.uint8(0x0F)
            for k in range(dst.shape[1]):
                dst[b, k, lane] = (dst[b, k, lane] & keep) | (codes[j, k] << shift)


@lru_cache(maxsize=None)
def layout_matches() -> bool:
    """Whether this torch packs as `pack` does (checked once on a random probe)."""
    probe = torch.randint(0, 16, (2 * BLOCK, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        theirs = torch._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 2)
    except (RuntimeError, AttributeError):
        return False
    return theirs.shape == (2 * BLOCK, 32) and torch.equal(theirs.view(torch.uint8), pack(probe))


def _table(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, G] scales and zeros (fp32) into the kernel's [G, N, 2] table."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype).contiguous()


def int4_matrix(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype) -> Int4Matrix:
    """W = q * scale + minimum per group (q [N, K] uint8 0..15, scale and minimum fp16 [N, G])."""
    s, m = scale.float(), minimum.float()
    return Int4Matrix(pack_any(q), _table(s, m + 8 * s, dtype), q.shape[1] // scale.shape[1])


def int8_matrix(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[Int4Matrix, Int4Matrix]:
    """W = q * scale per group (q [N, K] int8 in [-127, 127]) as two int4 matrices that add up."""
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    s, group = scale.float(), q.shape[1] // scale.shape[1]
    hi = Int4Matrix(pack_any(u >> 4), _table(16 * s, torch.zeros_like(s), dtype), group)
    lo = Int4Matrix(pack_any(u & 15), _table(s, 8 * s, dtype), group)
    return hi, lo


def int4_linear(x: torch.Tensor, parts: tuple[Int4Matrix, ...]) -> torch.Tensor:
    """x [S, K] @ Wᵀ for W the sum of `parts`: [S, N] in x's dtype."""
    out = torch._weight_int4pack_mm_for_cpu(x, parts[0].packed, parts[0].group, parts[0].table)
    for part in parts[1:]:
        out += torch._weight_int4pack_mm_for_cpu(x, part.packed, part.group, part.table)
    return out


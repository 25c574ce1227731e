"""Products on quantized weights where they lie, for a few tokens at a time: decode steps, sparse
steps and correction chunks read a layer's packed bytes once instead of dequantizing them into
a tile (three passes over memory). Triton kernels (`ferry.kernels.gemv_triton`) on CUDA; the
reference they must reproduce is dequantize, then `F.linear` (`ferry.kernels.quant`).

`ENABLED`: None runs them on CUDA where Triton imports (CUDA builds of torch bring it); True
runs them on any device, which on the CPU means Triton's interpreter (set TRITON_INTERPRET=1
before ferry imports Triton; the tests do); False never. Wider passes (prefill) stay on tiles,
which are compute-bound there.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

ENABLED: bool | None = None
MAX_ROWS = 16  # tokens a kernel call takes (a correction chunk of K <= 16); more go through tiles
# Blocks (untuned: no GPU has run them yet). Rows kernel, rows and values per step: one token
# takes few rows and long runs of values (many programs, wide loads), several tokens 16+ rows
# for tl.dot. Columns kernel: neurons and output columns per step.
BLOCK_R1, BLOCK_V1 = 8, 256
BLOCK_R, BLOCK_V = 32, 128
BLOCK_N, BLOCK_H = 32, 128
PROGRAMS = 1024  # programs the columns kernel aims for (splitting its neurons) so every SM works
BLOCK_SUM = 1024  # values per program adding up the columns kernel's partial sums


def available(device: torch.device | str) -> bool:
    """Whether the kernels run on this device (Triton importable, and CUDA unless ENABLED)."""
    return triton_runs(ENABLED, device)


def triton_runs(enabled: bool | None, device: torch.device | str) -> bool:
    """Whether a module's Triton kernels run on this device, given its switch: None on CUDA,
    True anywhere (on the CPU, Triton's interpreter), False never; and Triton importable."""
    if enabled is False or (enabled is None and torch.device(device).type != "cuda"):
        return False
    return triton_installed()


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether Triton imports here (looked up once: the lookup costs more than a small kernel)."""
    return importlib.util.find_spec("triton") is not None


def planned(device: torch.device | str) -> bool:
    """Whether a plan for this device counts on the kernels: on CUDA yes (CUDA builds of torch
    bring Triton), unless ENABLED says otherwise; the machine planning need not have Triton."""
    return ENABLED is True or (ENABLED is None and torch.device(device).type == "cuda")


def usable(x: torch.Tensor) -> bool:
    """Whether a product over activations x [M, C] goes through the kernels."""
    return x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and available(x.device)


def _block_m(m: int) -> int:
    return 1 if m == 1 else max(16, 1 << (m - 1).bit_length())  # tl.dot wants 16+ rows


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 exact, as the reference


def _codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes.view(torch.int8) if bits == 8 else codes


def rows_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                bits: int) -> torch.Tensor:
    """x [M, C] @ wᵀ for quantized rows w [R, C]: codes [R, C bits/8], fp16 scales (and mins)
    [R, C / group], each with unit stride along the row (rows may be strided: records); [M, R].
    Or for P parts of each of R records at once (records' gate and up rows): codes [R, P, C
    bits/8], scales and mins [R, P, C / group]; [M, P, R]."""
    from ferry.kernels.gemv_triton import rows_kernel

    x = x.contiguous()
    (m, c), r = x.shape, codes.shape[0]
    parts = codes.shape[1] if codes.dim() == 3 else 1
    out = x.new_empty(m, parts, r) if codes.dim() == 3 else x.new_empty(m, r)
    if r == 0:
        return out
    assert mins is None or mins.stride() == scales.stride(), "scales and mins share one stride"
    part_codes, part_scales = (codes.stride(1), scales.stride(1)) if codes.dim() == 3 else (0, 0)
    block_r, block_v = (BLOCK_R1, BLOCK_V1) if m == 1 else (BLOCK_R, BLOCK_V)
    rows_kernel[(-(-r * parts // block_r),)](
        x, _codes(codes, bits), scales, scales if mins is None else mins, out, m, r, parts, c,
        x.stride(0), codes.stride(0), part_codes, scales.stride(0), part_scales, out.stride(0),
        GROUP=c // scales.shape[-1], BITS=bits, HAS_MINS=mins is not None, BLOCK_M=_block_m(m),
        BLOCK_R=block_r, BLOCK_V=block_v, PRECISION=_precision(x.dtype))
    return out


def columns_linear(z: torch.Tensor, codes: torch.Tensor, index: torch.Tensor, table: tuple,
                   bits: int, group: int, programs: int = PROGRAMS, threshold: float | None = None) -> torch.Tensor:
    """z [M, N] @ w for N neurons' down columns w [N, H]: codes [N, H bits/8], index int32 [N]
    (each neuron's place in the checkpoint, naming its group), table (scales, mins or None)
    [I / group, H] down_proj's groups. Or, z given as the gate and up products [M, 2, N] (what
    `rows_linear` gives for records' two parts), the MLP's down product of SiLU(gate) * up, as
    `reference.gated` forms it with the CATS `threshold`."""
    from ferry.kernels.gemv_triton import columns_kernel, splits_kernel

    gated = z.dim() == 3
    if not gated and threshold is not None:
        raise ValueError("a threshold applies to gate and up products, not to activations")
    z = z.contiguous()
    stride_up = z.stride(1) if gated else 0
    (m, n), (scales, mins) = (z.shape[0], z.shape[-1]), table
    h = scales.shape[1]
    if n == 0:
        return z.new_zeros(m, h)
    col_blocks = -(-h // BLOCK_H)
    split = max(1, min(-(-n // BLOCK_N), programs // col_blocks))
    chunk = -(-(-(-n // split)) // BLOCK_N) * BLOCK_N  # neurons per split, whole blocks
    split = -(-n // chunk)
    partial = torch.empty(split, m, h, dtype=torch.float32, device=z.device)  # every element written
    # torch compares activations with the threshold rounded to their dtype
    bound = 0.0 if threshold is None else torch.tensor(threshold, dtype=z.dtype).item()
    columns_kernel[(col_blocks, split)](
        z, _codes(codes, bits), index, scales, scales if mins is None else mins, partial,
        m, n, h, chunk, z.stride(0), stride_up, bound, codes.stride(0), index.stride(0), scales.stride(0),
        partial.stride(0), partial.stride(1),
        GROUP=group, BITS=bits, HAS_MINS=mins is not None, GATED=gated, HAS_THRESHOLD=threshold is not None,
        BLOCK_M=_block_m(m), BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H, PRECISION=_precision(z.dtype))
    out = z.new_empty(m, h)
    splits_kernel[(-(-m * h // BLOCK_SUM),)](partial, out, split, m * h, BLOCK=BLOCK_SUM)
    return out

"""Row gather and scatter for rows of a 2-D tensor (the neuron reorder of Griffin): gather
out[r] = src[index[r]], scatter out[index[r]] = src[r].

`gather_rows` and `scatter_rows` are the fast paths (numba, parallel over rows, on raw bytes so
any dtype works); the `_reference` functions are the plain-torch definitions they are tested
against. CUDA tensors use torch's own index_select and index_copy_, which are device kernels.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ferry.kernels.threads import run_parallel


@numba.njit(parallel=True, cache=True)
def _gather_bytes(src: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    for r in numba.prange(index.shape[0]):
        out[r, :] = src[index[r], :]


@numba.njit(parallel=True, cache=True)
def _scatter_bytes(src: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    for r in numba.prange(index.shape[0]):
        out[index[r], :] = src[r, :]


def gather_rows_reference(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.index_select(src, 0, index, out=out)


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gather rows of src [R, C] (contiguous) into the preallocated out [len(index), C]."""
    if src.device.type != "cpu":
        return gather_rows_reference(src, index, out)
    return _run(_gather_bytes, src, index, out, indexed=src)


def _run(kernel, src: torch.Tensor, index: torch.Tensor, out: torch.Tensor, indexed: torch.Tensor) -> torch.Tensor:
    """Check what the kernels assume (they check no bounds), then run one on the raw bytes:
    contiguous rows of one dtype and width, one index per row of the other tensor than
    `indexed`, every index a row of `indexed`."""
    listed = out if indexed is src else src
    if not (src.is_contiguous() and out.is_contiguous()) or src.dtype != out.dtype:
        raise ValueError("gather_rows/scatter_rows need contiguous src/out of the same dtype")
    if src.shape[1:] != out.shape[1:] or index.shape != (listed.shape[0],):
        raise ValueError(f"rows of {tuple(src.shape)} and {tuple(out.shape)} by {tuple(index.shape)} indices")
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < indexed.shape[0]):
        raise ValueError(f"a row index outside 0..{indexed.shape[0] - 1}")
    rows = [t.view(torch.uint8).numpy().reshape(t.shape[0], -1) for t in (src, out)]
    run_parallel(kernel, rows[0], index.numpy().astype(np.int64, copy=False), rows[1])
    return out


def scatter_rows_reference(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out.index_copy_(0, index, src)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the rows of src [len(index), C] into out [R, C] at rows `index` (distinct, in range)."""
    if out.device.type != "cpu":
        return scatter_rows_reference(src, index, out)
    return _run(_scatter_bytes, src, index, out, indexed=out)


def moved_rows(order: torch.Tensor) -> torch.Tensor:
    """The places a permutation changes (int64, ascending): the only rows a reorder copies."""
    return (order != torch.arange(order.numel(), device=order.device)).nonzero().flatten()

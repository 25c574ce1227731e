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
    _check(src, out, index)
    run_parallel(_gather_bytes, _rows_bytes(src), index.numpy().astype(np.int64, copy=False), _rows_bytes(out))
    return out


def _check(indexed: torch.Tensor, listed: torch.Tensor, index: torch.Tensor) -> None:
    """What the kernels assume (they check no bounds): contiguous rows of one dtype and width,
    `listed` holding one row per index, every index a row of `indexed`."""
    if not (indexed.is_contiguous() and listed.is_contiguous()) or indexed.dtype != listed.dtype:
        raise ValueError("gather_rows/scatter_rows need contiguous src/out of the same dtype")
    if indexed.shape[1:] != listed.shape[1:] or index.shape != (listed.shape[0],):
        raise ValueError(f"rows of {tuple(indexed.shape)} and {tuple(listed.shape)} by {tuple(index.shape)} indices")
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < indexed.shape[0]):
        raise ValueError(f"a row index outside 0..{indexed.shape[0] - 1}")


def _rows_bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy().reshape(t.shape[0], -1)


def scatter_rows_reference(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out.index_copy_(0, index, src)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the rows of src [len(index), C] into out [R, C] at rows `index` (distinct, in range)."""
    if out.device.type != "cpu":
        return scatter_rows_reference(src, index, out)
    _check(out, src, index)
    run_parallel(_scatter_bytes, _rows_bytes(src), index.numpy().astype(np.int64, copy=False), _rows_bytes(out))
    return out


def moved_rows(order: torch.Tensor) -> torch.Tensor:
    """The places a permutation changes (int64, ascending): the only rows a reorder copies."""
    return (order != torch.arange(order.numel(), device=order.device)).nonzero().flatten()

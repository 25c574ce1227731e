"""Row gather: out[r] = src[index[r]] for rows of a 2-D tensor (the neuron reorder of Griffin).

`gather_rows` is the fast path (numba, parallel over rows, on raw bytes so any dtype works);
`gather_rows_reference` is the plain-torch definition it is tested against. CUDA tensors use
torch's own index_select, which is already a device kernel.
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


def gather_rows_reference(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.index_select(src, 0, index, out=out)


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gather rows of src [R, C] (contiguous) into the preallocated out [len(index), C]."""
    if src.device.type != "cpu":
        return gather_rows_reference(src, index, out)
    if not (src.is_contiguous() and out.is_contiguous()) or src.dtype != out.dtype:
        raise ValueError("gather_rows needs contiguous src/out of the same dtype")
    row_bytes = src.shape[1] * src.element_size()
    src_b = src.view(torch.uint8).numpy().reshape(src.shape[0], row_bytes)
    out_b = out.view(torch.uint8).numpy().reshape(out.shape[0], row_bytes)
    run_parallel(_gather_bytes, src_b, index.numpy().astype(np.int64, copy=False), out_b)
    return out

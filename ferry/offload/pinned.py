"""Host buffers for the link: page-locked at their exact size where CUDA allows, else pageable.

Pinning registers memory with CUDA; it involves no stream or event, which stay in
`ferry.offload.transfer`.
"""

from __future__ import annotations

import mmap
import warnings
import weakref

import torch

_pin_warned = False


def _cudart():
    """CUDA's runtime API as torch exposes it (a function so tests can stand a fake in)."""
    return torch.cuda.cudart()


def _unregister(cudart, ptr: int) -> None:
    """Unpin before the pages go back to the system (weakref callback of the owning buffer)."""
    try:
        cudart.cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 -- interpreter shutdown: CUDA may be gone already
        pass


def _registered_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A page-locked buffer of exactly numel elements (rounded up to a page, not a power of two).

    torch's `pin_memory=True` goes through the caching host allocator, which rounds every block
    up to a power of two: a 1.59 GiB layer would lock 2 GiB, and 80 of them 33 GB more than the
    plan. Instead an anonymous mapping of the exact size is registered with CUDA
    (cudaHostRegister) and unregistered when the mapping is collected (the tensor keeps it
    alive through torch.frombuffer). Raises RuntimeError when CUDA refuses.
    """
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, max(nbytes, 1))  # page-aligned, zero pages mapped on first touch
    flat = torch.frombuffer(region, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
    if not numel:
        return flat
    cudart, ptr = _cudart(), flat.data_ptr()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed ({err})")
    weakref.finalize(region, _unregister, cudart, ptr)
    return flat


def host_empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host buffer, page-locked when asked and possible, else pageable (with one warning).

    Pinned buffers cost exactly their size (see `_registered_empty`); this stays the one entry
    point the loaders call per layer, so they need not know how pinning is done."""
    global _pin_warned
    if pin:
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available")
            return _registered_empty(numel, dtype)
        except RuntimeError as err:  # WSL2 and locked-memory limits refuse large pinned buffers
            if not _pin_warned:
                warnings.warn(f"pinning host memory failed ({err}); using pageable memory: host-to-device "
                              "copies will be slower and will not overlap compute (a copy from pageable "
                              "memory waits for the device)", stacklevel=2)
                _pin_warned = True
    return torch.empty(numel, dtype=dtype)

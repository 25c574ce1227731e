"""Parallel numba kernels beside torch: one thread budget for both.

numba's OpenMP layer and torch share the process's OpenMP pool, and launching a parallel numba
kernel can resize it, undoing a user's `torch.set_num_threads`. Every parallel kernel call goes
through `run_parallel`, which runs it on torch's thread count and leaves that count as it was.
"""

from __future__ import annotations

import numba
import torch


def run_parallel(kernel, *args) -> None:
    threads = torch.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    kernel(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

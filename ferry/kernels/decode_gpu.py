"""A decoder layer's small ops fused on the GPU: RMSNorm with the residual add before it, and rope
with the KV cache writes, each one Triton kernel (`ferry.kernels.decode_triton`) instead of about
eight torch kernels. A resident step of a large model runs ~15 torch kernels a layer outside its
products; inside a CUDA graph each still costs a few µs of the GPU's time, which the byte floor
of a sparse step does not pay for.

`ENABLED`: None runs them on CUDA where Triton imports; True on any device, which on the CPU
means Triton's interpreter (the tests); False never. The reference is `ferry.kernels.reference`
(tests/test_decode_gpu.py).
"""

from __future__ import annotations

import torch

from ferry.kernels.gemv import triton_runs

ENABLED: bool | None = None
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available(device: torch.device | str) -> bool:
    return triton_runs(ENABLED, device)


def usable(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a pass over x [S, ...] takes these kernels: on their device, in a float dtype
    that the other tensors it combines with (norm weights, caches, rope tables) share."""
    return x.dtype in DTYPES and all(t.dtype == x.dtype for t in others) and available(x.device)


def _contiguous(*tensors: torch.Tensor) -> None:
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("the fused decode kernels take contiguous tensors")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.rms_norm(x + residual)` for rows x [S, H]; with a residual, x is updated in
    place to x + residual (the caller's residual stream) and must be its own tensor."""
    from ferry.kernels.decode_triton import rms_norm_kernel

    _contiguous(x, weight, *(() if residual is None else (residual,)))
    s, n = x.shape
    if weight.numel() != n or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: rows of {n} values, a weight of {weight.numel()}, a residual "
                         f"{None if residual is None else tuple(residual.shape)}")
    out = torch.empty_like(x)
    block = _block(n)
    rms_norm_kernel[(s,)](x, x if residual is None else residual, weight, out, n, eps,
                          HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
                          enable_fp_fusion=False)
    return out


def _block(n: int) -> int:
    """The power of two a kernel's block of n values takes."""
    return 1 << (n - 1).bit_length()


def rope_write(cfg, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, pos: "int | torch.Tensor") -> torch.Tensor:
    """Tokens' qkv [S, q + 2 kv] at positions pos..pos+S-1: keys (rotated) and values written
    into the caches [(1,) kv_heads, L, head_dim], the rotated queries returned [heads, S, head_dim].
    pos an int: cos/sin are the tables' rows for these tokens [S, head_dim]; pos a device tensor
    [1] (a captured step): cos/sin are the whole tables, read at its value."""
    from ferry.kernels.decode_triton import rope_write_kernel

    _contiguous(cos, sin, k_cache, v_cache)
    if qkv.stride(1) != 1:
        raise ValueError("the fused decode kernels take rows of contiguous values")
    s, from_ptr = qkv.shape[0], isinstance(pos, torch.Tensor)
    heads, kv_heads, d, capacity = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, k_cache.shape[-2]
    if qkv.shape[1] != (heads + 2 * kv_heads) * d or k_cache.shape[-3:] != (kv_heads, capacity, d) \
            or k_cache.numel() != kv_heads * capacity * d or v_cache.shape != k_cache.shape \
            or cos.shape != sin.shape or cos.shape[-1] != d:
        raise ValueError("rope_write: qkv, caches or tables do not fit the model's heads")
    if not from_ptr and not (0 <= pos and pos + s <= capacity and cos.shape[0] >= s):
        raise ValueError(f"positions {pos}..{pos + s - 1} outside a cache of {capacity} or the tables given")
    q = torch.empty(heads, s, d, dtype=qkv.dtype, device=qkv.device)
    rope_write_kernel[(s, heads + 2 * kv_heads)](
        qkv, cos, sin, pos if from_ptr else qkv, 0 if from_ptr else pos, k_cache, v_cache, q, s, qkv.stride(0),
        heads, kv_heads, capacity, HEAD_DIM=d, BLOCK_HALF=_block(d // 2),
        POS_FROM_PTR=from_ptr, enable_fp_fusion=False)  # no fused multiply-adds: torch rounds each product
    return q

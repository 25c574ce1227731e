"""The in-place kernels (`ferry.kernels.gemv`) on a layer's matrices: each against the reference
(dequantize, then the plain product) on the device, and its achieved read bandwidth against a
measured device-to-device copy. Then a layer's fused small ops (`ferry.kernels.decode_gpu`:
RMSNorm with the residual add, rope with the cache writes) for one token against the torch ops
they replace, at Llama-3-70B's attention shapes: time and largest difference. The GPU suite runs
this; alone:

    python bench/gemv_check.py            # CUDA, Llama-3-8B's MLP shapes
    TRITON_INTERPRET=1 python bench/gemv_check.py --tiny   # CPU: Triton's interpreter (a check)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from ferry.kernels import decode_gpu, gemv  # noqa: E402
from ferry.kernels.reference import rms_norm  # noqa: E402
from ferry.model.forward import rotate_qk  # noqa: E402
from ferry.kernels.quant import Grouped, pack_int4  # noqa: E402


def seconds(device: str, fn) -> float:
    """Seconds one fn() takes, with CUDA events on the GPU (the synchronize is the timer's)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _time(device: str, fn, reps: int) -> float:
    """Median seconds of fn() after one warm-up."""
    fn()
    return statistics.median(seconds(device, fn) for _ in range(reps))


def copy_gbps(device: str, nbytes: int, reps: int) -> float:
    """Bytes read plus written per second by one large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(device, lambda: dst.copy_(src), reps) / 1e9


def random_groups(rows: int, cols: int, bits: int, group: int, device: str) -> Grouped:
    gen = torch.Generator(device=device).manual_seed(rows + cols + bits)
    if bits == 4:
        q = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, device=device, generator=gen)
        lo = (torch.rand(rows, cols // group, device=device, generator=gen) - 0.5) * 0.04
        return Grouped(q, (torch.rand_like(lo) * 0.004).half(), lo.half(), 4)
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, device=device, generator=gen)
    return Grouped(q, (torch.rand(rows, cols // group, device=device, generator=gen) * 4e-4).half(), None, 8)


def _row(name: str, got: torch.Tensor, ref: torch.Tensor, seconds: float, nbytes: int, copy: float) -> dict:
    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    gbps = nbytes / seconds / 1e9
    return {"kernel": name, "max_rel_error": err, "us": seconds * 1e6, "bytes": nbytes, "read_gbps": gbps,
            "of_copy_peak": gbps / copy}


def check(device: str, hidden: int, inter: int, dtype: torch.dtype, reps: int = 20, group: int = 32) -> dict:
    """Rows (gate [I, H]) and down columns ([I neurons, H]) for int4 and int8, one token each,
    plus rows for a 16-token chunk: error against the reference, time, and bandwidth."""
    copy = copy_gbps(device, 1 << 30 if device == "cuda" else 1 << 24, reps)
    rows = []
    for bits in (4, 8):
        w = random_groups(inter, hidden, bits, group, device)  # gate rows
        codes, scales, mins = w.packed()
        nbytes = codes.numel() + 2 * scales.numel() * (2 if mins is not None else 1)
        ref_w = w.dequantize(dtype)
        for tokens in (1, 16):
            x = torch.randn(tokens, hidden, device=device).to(dtype)
            got = gemv.rows_linear(x, codes, scales, mins, bits)
            t = _time(device, lambda: gemv.rows_linear(x, codes, scales, mins, bits), reps)
            rows.append(_row(f"rows int{bits} [{inter}x{hidden}] x{tokens}", got, F.linear(x, ref_w), t, nbytes, copy))
        down = random_groups(hidden, inter, bits, group, device)  # down_proj [H, I], groups along I
        columns = down.q.t().contiguous()  # neuron-major: each neuron's column
        codes = columns.view(torch.uint8) if bits == 8 else pack_int4(columns)
        index = torch.randperm(inter, device=device).int()  # a reorder: every neuron's own group
        table = (down.scale.t().contiguous(), None if down.minimum is None else down.minimum.t().contiguous())
        z = torch.randn(1, inter, device=device).to(dtype)
        records = codes[index.long()]  # record j holds neuron index[j]'s column
        got = gemv.columns_linear(z, records, index, table, bits, group)
        ref = z @ down.dequantize(dtype)[:, index.long()].t()
        t = _time(device, lambda: gemv.columns_linear(z, records, index, table, bits, group), reps)
        nbytes = codes.numel() + 2 * table[0].numel() * (2 if bits == 4 else 1) + 4 * inter
        rows.append(_row(f"down int{bits} [{inter}x{hidden}] x1", got, ref, t, nbytes, copy))
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
            "dtype": str(dtype).removeprefix("torch."), "copy_gbps": copy, "rows": rows,
            "small_ops": check_small_ops(device, dtype, reps, tiny=hidden < 1024)}


class _Attention:
    """Llama-3-70B's attention shapes (64 query heads over 8 KV heads of 128), or small ones."""

    def __init__(self, tiny: bool):
        self.num_heads, self.num_kv_heads, self.head_dim = (4, 2, 32) if tiny else (64, 8, 128)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim


def check_small_ops(device: str, dtype: torch.dtype, reps: int, tiny: bool = False) -> list[dict]:
    """One token's RMSNorm (with the residual add) and rope with both cache writes: the fused
    kernel against the torch ops (`reference`), µs each and the largest difference."""
    cfg, pos = _Attention(tiny), 1000
    hidden, capacity = cfg.q_size, 4096
    gen = torch.Generator(device=device).manual_seed(0)
    x, res = (torch.randn(1, hidden, device=device, generator=gen).to(dtype) for _ in range(2))
    weight = torch.rand(hidden, device=device, generator=gen).to(dtype) + 0.5
    qkv = torch.randn(1, cfg.q_size + 2 * cfg.kv_size, device=device, generator=gen).to(dtype)
    angles = torch.rand(1, cfg.head_dim, device=device, generator=gen) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    k_cache, v_cache = (torch.zeros(cfg.num_kv_heads, capacity, cfg.head_dim, dtype=dtype, device=device)
                        for _ in range(2))

    def torch_norm():
        return rms_norm(x + res, weight, 1e-5)

    def torch_rope():
        q, k = rotate_qk(cfg, qkv, cos, sin)
        k_cache[:, pos:pos + 1] = k
        v_cache[:, pos:pos + 1] = qkv[:, cfg.q_size + cfg.kv_size:].view(1, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
        return q

    def fused_norm():
        return decode_gpu.rms_norm(x.clone(), weight, 1e-5, residual=res)

    def fused_rope():
        return decode_gpu.rope_write(cfg, qkv, cos, sin, k_cache, v_cache, pos)

    rows = []
    for name, ours, ref in (("rms_norm + residual", fused_norm, torch_norm), ("rope + cache writes", fused_rope, torch_rope)):
        diff = (ours().float() - ref().float()).abs().max().item()
        t_ours, t_ref = _time(device, ours, reps), _time(device, ref, reps)
        rows.append({"op": name, "max_abs_diff": diff, "fused_us": t_ours * 1e6, "torch_us": t_ref * 1e6})
    return rows


def report(result: dict) -> None:
    print(f"in-place kernels on {result['device']}, {result['dtype']}; device copy {result['copy_gbps']:.0f} GB/s "
          f"(read + write)")
    print(f"{'kernel':34}{'max rel err':>12}{'us':>9}{'GB/s read':>11}{'of copy':>9}")
    for r in result["rows"]:
        print(f"{r['kernel']:34}{r['max_rel_error']:12.1e}{r['us']:9.1f}{r['read_gbps']:11.0f}{r['of_copy_peak']:9.2f}")
    print(f"{'one token, fused vs torch ops':34}{'max diff':>12}{'fused us':>10}{'torch us':>10}")
    for r in result.get("small_ops", []):
        print(f"{r['op']:34}{r['max_abs_diff']:12.1e}{r['fused_us']:10.1f}{r['torch_us']:10.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, small shapes (Triton's interpreter)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        gemv.ENABLED = decode_gpu.ENABLED = True
    result = check(device, *((256, 1024) if args.tiny else (4096, 14336)),
                   torch.float32 if args.tiny else torch.bfloat16, reps=2 if args.tiny else args.reps)
    report(result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

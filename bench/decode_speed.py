"""Decode speed: ferry vs transformers' generate on the embedded default model, dense and sparse.

Same process, same dtype, same prompt, greedy, fixed length (end-of-sequence ignored); runs are
interleaved so machine noise hits all alike. Besides dense ferry and transformers it times ferry
with every step sparse (Griffin, `--sparsity`, mode="sparse"): the step-rate ratio sparse/dense
against its ceiling 1/d_sparse (the fraction of parameters a sparse step reads), and how long
the sparse greedy tokens stay identical to the dense ones. Prints a table, then one JSON line.

`--attention` instead times decode attention alone at the model's shapes (9 query heads over 3
KV heads, head_dim 64; S = 1, and S = 16 with its causal mask as in the correction pass): SDPA
against `ferry.kernels.attention.attend_manual`, interleaved, per call.

    python bench/decode_speed.py [--runs 7] [--new-tokens 64] [--dtype bf16] [--sparsity 0.5]
    python bench/decode_speed.py --attention [--runs 7] [--dtype bf16]
    python bench/decode_speed.py --small-ops [--runs 15] [--sparsity 0.5]

`--small-ops` times one-token steps (dense and sparse, bf16 and int4 weights, every layer
resident) with the fused CPU kernels of `ferry.kernels.decode_cpu` against the same steps on
torch's ops, interleaved: what fusing RMSNorm, rope with the cache writes and the MLP's
activations saves per step, and how it moves the sparse/dense step ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import ferry
from ferry.kernels import decode_cpu
from ferry.kernels.attention import attend_manual
from ferry.model.forward import forward
from ferry.offload.accounting import d_sparse
from ferry.offload.sources import default_model_gguf

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def time_ferry(engine, n: int) -> tuple[float, float, list[int]]:
    """(end-to-end seconds, decode tokens/s, token ids)."""
    t0 = time.perf_counter()
    result = engine.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
    return time.perf_counter() - t0, result.stats.tokens_per_s, result.token_ids


def time_hf(model, ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
    return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()


def load_pair(dtype_name: str):
    """ferry and transformers on the default model, same dtype, same dense weights; the prompt's ids.

    Both read the packaged GGUF dequantized to `dtype`: ferry's converted folder holds its own
    int4 form, which transformers cannot read (it would run random weights), and ferry would
    keep int4 by default (quant "auto"), so it is told "none"."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    engine = ferry.load(dtype=dtype_name, device="cpu", progress=False, reuse_prefix=False, quant="none")
    gguf = default_model_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()
    return engine, hf, torch.tensor([engine.encode(PROMPT)])


def attention_inputs(s: int, keys: int, dtype: torch.dtype):
    """q [3, 3 S, 64] and k/v slices of a cache, as forward.attention passes them; causal mask."""
    q = torch.randn(9, s, 64).to(dtype).reshape(3, 3 * s, 64)
    k_cache, v_cache = (torch.randn(3, 2048, 64).to(dtype) for _ in range(2))
    mask = None
    if s > 1:
        mask = (torch.arange(keys)[None] <= torch.arange(keys - s, keys)[:, None]).repeat(3, 1)
    return q, k_cache[:, :keys], v_cache[:, :keys], mask


def time_attention(runs: int, dtype: torch.dtype) -> list[dict]:
    """Microseconds per call, SDPA and manual interleaved; median over runs of a batch of calls."""
    # 4-D [1, heads, rows, d], as `ferry.kernels.attention.attend` calls it (3-D is several times slower)
    sdpa = lambda q, k, v, m: F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=m, scale=0.125)[0]  # noqa: E731
    manual = lambda q, k, v, m: attend_manual(q, k, v, 0.125, m)  # noqa: E731
    rows = []
    for s, keys in [(1, 64), (1, 256), (1, 1024), (16, 80), (16, 256), (16, 1024)]:
        args = attention_inputs(s, keys, dtype)
        calls = max(20, 4000 // (s * keys // 64 + 1))
        times: dict[str, list[float]] = {"sdpa": [], "manual": []}
        for run in range(runs + 1):  # run 0 warms up
            for name, fn in (("sdpa", sdpa), ("manual", manual))[:: 1 if run % 2 else -1]:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(*args)
                if run:
                    times[name].append((time.perf_counter() - t0) / calls * 1e6)
        a, b = statistics.median(times["sdpa"]), statistics.median(times["manual"])
        rows.append({"s": s, "keys": keys, "sdpa_us": round(a, 1), "manual_us": round(b, 1), "speedup": round(a / b, 2)})
    return rows


def attention_main(args) -> None:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = time_attention(args.runs, dtype)
    print(f"decode attention, {args.dtype}, 3 KV heads x 3 queries, head_dim 64, CPU "
          f"({torch.get_num_threads()} threads), median of {args.runs} interleaved runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'S':>3}{'keys':>6}{'SDPA us':>10}{'manual us':>11}{'SDPA/manual':>13}")
    for r in rows:
        print(f"{r['s']:3}{r['keys']:6}{r['sdpa_us']:10.1f}{r['manual_us']:11.1f}{r['speedup']:13.2f}")
    print(json.dumps({"bench": "decode_attention", "dtype": args.dtype, "device": "cpu",
                      "threads": torch.get_num_threads(), "runs": args.runs,
                      "load_average": round(os.getloadavg()[0], 2), "rows": rows}))


def time_steps(engine, fused: bool, reps: int = 10) -> dict[str, float]:
    """Milliseconds per one-token step, dense and sparse weights, at the cache's end (rewritten)."""
    decode_cpu.ENABLED = None if fused else False
    rt = engine.runtime
    ctx, token = rt.context, torch.tensor([42])
    start, times = min(ctx.cache.length, ctx.cache.capacity - 1), {}
    for kind, weights in (("dense", rt.weights), ("sparse", rt.sparse_weights)):
        step = lambda: forward(rt.model, weights, ctx.rope, ctx.cache, token, start, all_logits=False)  # noqa: E731
        step()
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        times[kind] = (time.perf_counter() - t0) / reps * 1e3
    decode_cpu.ENABLED = None
    return times


def small_ops_main(args) -> None:
    engines = {q: ferry.load(device="cpu", progress=False, reuse_prefix=False, quant=q, sparsity=args.sparsity,
                             mode="sparse") for q in ("none", "auto")}
    for engine in engines.values():
        engine.generate(PROMPT, max_new_tokens=8, ignore_eos=True)  # a prompt in the cache, neurons chosen
    runs = {(q, fused): [] for q in engines for fused in (True, False)}
    for run in range(args.runs):
        for q, fused in runs if run % 2 else reversed(list(runs)):
            runs[q, fused].append(time_steps(engines[q], fused))
    print(f"one-token steps, every layer resident, CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), median ms of {args.runs} interleaved runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'weights':8}{'ops':>7}{'dense ms':>10}{'sparse ms':>11}{'sparse/dense':>14}{'per byte':>10}")
    rows = []
    for (q, fused), times in runs.items():
        dense, sparse = (statistics.median(t[k] for t in times) for k in ("dense", "sparse"))
        step = engines[q].plan.step_bytes
        reads = step.sparse_read / step.full_read
        row = {"weights": "bf16" if q == "none" else "int4", "ops": "fused" if fused else "torch",
               "dense_ms": round(dense, 3), "sparse_ms": round(sparse, 3), "step_ratio": round(dense / sparse, 3),
               "per_byte": round(dense / sparse * reads, 3)}
        rows.append(row)
        print(f"{row['weights']:8}{row['ops']:>7}{dense:10.3f}{sparse:11.3f}{dense / sparse:13.2f}x"
              f"{row['per_byte']:10.3f}")
    print(json.dumps({"bench": "decode_small_ops", "device": "cpu", "threads": torch.get_num_threads(),
                      "runs": args.runs, "sparsity": args.sparsity, "load_average": round(os.getloadavg()[0], 2),
                      "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--attention", action="store_true", help="time decode attention alone")
    parser.add_argument("--small-ops", action="store_true", help="time steps with and without the fused CPU kernels")
    args = parser.parse_args()
    if args.attention:
        return attention_main(args)
    if args.small_ops:
        return small_ops_main(args)
    engine, hf, ids = load_pair(args.dtype)
    sparse = ferry.load(dtype=args.dtype, device="cpu", progress=False, reuse_prefix=False, quant="none",
                        sparsity=args.sparsity, mode="sparse")
    n = args.new_tokens
    time_ferry(engine, n), time_hf(hf, ids, n), time_ferry(sparse, n)  # warm-up: first-call costs out
    density = d_sparse(sparse.model, args.sparsity, "griffin")
    ferry_total, ferry_decode, hf_total, hf_decode, sparse_decode = [], [], [], [], []
    for run in range(args.runs):
        order = ("ferry", "hf", "sparse") if run % 2 == 0 else ("sparse", "hf", "ferry")
        for who in order:
            if who == "sparse":
                _, rate, sparse_ids = time_ferry(sparse, n)
                sparse_decode.append(rate)
            elif who == "ferry":
                total, rate, ferry_ids = time_ferry(engine, n)
                ferry_total.append(total)
                ferry_decode.append(rate)
            else:
                one, _ = time_hf(hf, ids, 1)
                total, hf_ids = time_hf(hf, ids, n)
                hf_total.append(total)
                hf_decode.append((n - 1) / (total - one))
    agree = next((i for i, (a, b) in enumerate(zip(ferry_ids, hf_ids)) if a != b), n)
    f_tps, h_tps = n / statistics.median(ferry_total), n / statistics.median(hf_total)
    f_dec, h_dec = statistics.median(ferry_decode), statistics.median(hf_decode)
    s_dec = statistics.median(sparse_decode)
    # Per run, so both rates of a pair saw the same moment's load.
    sparse_ratio = statistics.median(s / d for s, d in zip(sparse_decode, ferry_decode))
    sparse_agree = next((i for i, (a, b) in enumerate(zip(sparse_ids, ferry_ids)) if a != b), n)
    print(f"SmolLM2-135M-Instruct, {args.dtype}, CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {n} new tokens, median of {args.runs} interleaved runs")
    print(f"{'':14}{'end-to-end tok/s':>18}{'decode tok/s':>14}")
    print(f"{'ferry':14}{f_tps:18.1f}{f_dec:14.1f}")
    print(f"{'transformers':14}{h_tps:18.1f}{h_dec:14.1f}")
    print(f"{'ratio':14}{f_tps / h_tps:18.2f}{f_dec / h_dec:14.2f}")
    print(f"greedy tokens identical for the first {agree} of {n}")
    print(f"ferry sparse (griffin, sparsity {args.sparsity}, every step): d_sparse {density:.3f}, "
          f"ceiling 1/d_sparse = {1 / density:.2f}x")
    print(f"{'ferry sparse':14}{'':18}{s_dec:14.1f}")
    print(f"{'sparse/dense':14}{'':18}{sparse_ratio:14.2f}  (median of per-run ratios)")
    print(f"sparse greedy tokens identical to dense for the first {sparse_agree} of {n}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({
        "bench": "decode_speed", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "device": "cpu",
        "threads": torch.get_num_threads(), "new_tokens": n, "runs": args.runs,
        "ferry_tokens_per_s": round(f_tps, 2), "transformers_tokens_per_s": round(h_tps, 2),
        "ferry_decode_tokens_per_s": round(f_dec, 2), "transformers_decode_tokens_per_s": round(h_dec, 2),
        "ratio_end_to_end": round(f_tps / h_tps, 3), "ratio_decode": round(f_dec / h_dec, 3),
        "greedy_agreement_tokens": agree,
        "sparsity": args.sparsity, "d_sparse": round(density, 4), "sparse_ceiling": round(1 / density, 3),
        "ferry_sparse_decode_tokens_per_s": round(s_dec, 2), "ratio_sparse_dense_decode": round(sparse_ratio, 3),
        "sparse_dense_agreement_tokens": sparse_agree, "load_average": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()

"""Resident decode steps at a large model's widths on the CPU: dense and sparse steps of bf16, int8
and int4 weights, each against the bytes it reads.

The default model's matrices are small (576 x 1536), so a step's fixed costs (attention, norms,
the Python loop) weigh on every ratio measured on it. This script writes a random model with
Llama-3-8B's layer widths but only a few layers and a 32k vocabulary (`gpu_suite.py`'s writer,
nothing downloaded; reused once written), loads it six ways, every layer resident, and times
their decode steps in interleaved runs. For each step: ms, the bytes it reads (the plan's), the
GB/s that makes, and its time against those bytes divided by the measured read bandwidth (a
sum over 1 GiB of fp32, timed in every run beside the steps); for each weight format, the sparse
step's rate per byte read against the dense step's, and the time a prompt's neuron selection
takes (Griffin's reorder of every layer).

    python bench/wide_steps.py [--runs 5] [--new-tokens 16] [--sparsity 0.5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ferry  # noqa: E402
from gpu_suite import SHAPES, log, write_random_llama  # noqa: E402

SHAPE = "8b-layers"
FORMATS = {"bf16": dict(quant="none"), "int8": dict(quant="int8", quant_fit=False),
           "int4": dict(quant="int4", quant_fit=False)}  # fitting random weights buys nothing


def read_gbps(data: torch.Tensor) -> float:
    """GB/s of one streaming read of `data` (a sum: memory-bound, no write back)."""
    start = time.perf_counter()
    data.sum()
    return data.numel() * data.element_size() / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--folder", type=Path, default=Path(f"/tmp/ferry-random-{SHAPE}"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = write_random_llama(args.folder, SHAPE, "cpu")
    engines = {}
    for fmt, options in FORMATS.items():
        for kind, extra in (("dense", dict(mode="dense")), ("sparse", dict(mode="sparse", sparsity=args.sparsity))):
            engines[fmt, kind] = ferry.load(folder, device="cpu", dtype="bf16", ctx=64, progress=False,
                                            reuse_prefix=False, **options, **extra)
            log(f"loaded {fmt} {kind}")
    vocab = SHAPES[SHAPE]["vocab_size"]
    prompt = " ".join(f"w{7 * n % vocab:06d}" for n in range(2, 18))  # 16 words, one token each
    for engine in engines.values():  # warm every path
        engine.generate(prompt, max_new_tokens=2, ignore_eos=True, chat=False)
    seconds = {key: [] for key in engines}
    select = {key: [] for key in engines if key[1] == "sparse"}
    data, reads = torch.ones(1 << 28), []  # 1 GiB
    for run in range(args.runs):
        reads.append(read_gbps(data))
        for key, engine in engines.items():
            st = engine.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True, chat=False).stats
            seconds[key].append(st.decode_s / max(1, st.new_tokens - 1))
            if key in select:
                select[key].append(st.select_s)
        log(f"run {run + 1}/{args.runs}")
    report(args, engines, {key: statistics.median(s) for key, s in seconds.items()}, statistics.median(reads),
           {fmt: statistics.median(s) for (fmt, _), s in select.items()})


def report(args, engines: dict, step_s: dict, read_gbps: float, select_s: dict) -> None:
    s = SHAPES[SHAPE]
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}; random model, "
          f"hidden {s['hidden_size']}, intermediate {s['intermediate_size']}, {s['num_hidden_layers']} layers, "
          f"vocab {s['vocab_size']}; every layer resident; {args.runs} interleaved runs of {args.new_tokens} tokens")
    print(f"read bandwidth (a sum over 1 GiB, median of the runs): {read_gbps:.1f} GB/s")
    print(f"{'step':<14}{'ms':>8}{'MB read':>10}{'GB/s':>8}{'vs floor':>10}")
    rows = {}
    for (fmt, kind), engine in engines.items():
        c = engine.plan.step_bytes
        read = c.sparse_read if kind == "sparse" else c.full_read
        t = step_s[fmt, kind]
        rows[f"{fmt} {kind}"] = dict(s=t, bytes_read=read, gbps=read / t / 1e9, vs_floor=t / (read / (read_gbps * 1e9)))
        r = rows[f"{fmt} {kind}"]
        print(f"{fmt + ' ' + kind:<14}{t * 1e3:8.2f}{read / 1e6:10.1f}{r['gbps']:8.1f}{r['vs_floor']:10.2f}")
    ratios = {}
    for fmt in FORMATS:
        dense, sparse = rows[f"{fmt} dense"], rows[f"{fmt} sparse"]
        speed, frac = dense["s"] / sparse["s"], sparse["bytes_read"] / dense["bytes_read"]
        ratios[fmt] = dict(step_ratio=speed, bytes_fraction=frac, per_byte=speed * frac, select_s=select_s[fmt])
        print(f"{fmt}: sparse/dense step rate {speed:.2f}x reading {frac:.2f} of the bytes: {speed * frac:.2f} per byte; "
              f"selection {select_s[fmt] * 1e3:.0f} ms")
    print(json.dumps(dict(bench="wide_steps", shape=s, read_gbps=read_gbps, steps=rows, sparse=ratios,
                          threads=torch.get_num_threads(), runs=args.runs, new_tokens=args.new_tokens)))


if __name__ == "__main__":
    main()

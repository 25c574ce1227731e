"""Quantized decode speed: int4 and int8 weights against bf16, every layer resident, one process.

The default model is loaded several ways (all on the CPU, every layer resident, bf16 compute):
bf16 weights (`quant="none"`), int4 (the source's own groups, `quant="auto"`) and int8, each
quantized one through the packed int4 kernel (`ferry.model.packed`, with the int8 lm_head) and,
for comparison, through the dequantize-then-matmul path it replaces (lm_head in bf16, as
before the kernel). Runs are interleaved, so machine noise
hits all alike; the table gives median decode tokens/s and the ratio to bf16. Sparse rows time
steps at `--sparsity` (Griffin, mode "sparse") against the dense steps of the same weights, per
parameter read (`d_sparse`: the fraction of parameters a sparse step reads, from the plan's
bytes). Greedy tokens of each run are compared with bf16's.

    python bench/quant_speed.py [--runs 5] [--new-tokens 64] [--sparsity 0.5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

import ferry
from ferry.model import packed

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CONFIGS = {  # name: (load options, packed kernel on)
    "bf16": (dict(quant="none"), True),
    "int4": (dict(quant="auto"), True),
    "int4 dequant": (dict(quant="auto", quant_lm_head="none"), False),
    "int8": (dict(quant="int8"), True),
    "int8 dequant": (dict(quant="int8", quant_lm_head="none"), False),
}


def load(options: dict, kernel: bool, sparsity: float):
    packed.ENABLED = None if kernel else False
    try:
        extra = dict(sparsity=sparsity, mode="sparse") if sparsity else {}
        return ferry.load(device="cpu", progress=False, reuse_prefix=False, **options, **extra)
    finally:
        packed.ENABLED = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {name: load(opts, kernel, 0.0) for name, (opts, kernel) in CONFIGS.items()}
    if args.sparsity:
        for name in ("bf16", "int4", "int8"):
            opts, kernel = CONFIGS[name]
            runs[f"{name} sparse"] = load(opts, kernel, args.sparsity)
    rates = {name: [] for name in runs}
    tokens = {}
    for _ in range(args.runs):
        for name, engine in runs.items():
            result = engine.generate(PROMPT, max_new_tokens=args.new_tokens, ignore_eos=True)
            rates[name].append(result.stats.tokens_per_s)
            tokens[name] = result.token_ids
    report(args, runs, rates, tokens)


def report(args, runs, rates, tokens) -> None:
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{args.runs} interleaved runs of {args.new_tokens} tokens")
    print(f"{'weights':<14} {'tok/s':>7} {'vs bf16':>8} {'same as bf16':>13}")
    for name, rate in med.items():
        base = "bf16 sparse" if name.endswith("sparse") else "bf16"
        same = sum(a == b for a, b in zip(tokens[name], tokens[base]))
        print(f"{name:<14} {rate:7.1f} {rate / med[base]:7.2f}x {same:>6}/{len(tokens[base])}")
    sparse = {}
    for name in ("bf16", "int4", "int8"):
        if f"{name} sparse" in med:
            d = runs[f"{name} sparse"].plan.step_bytes
            ratio = med[f"{name} sparse"] / med[name]
            sparse[name] = dict(step_ratio=ratio, d_sparse=d.sparse_read / d.full_read)
            print(f"{name}: sparse/dense step rate {ratio:.2f}x, bytes read per sparse step "
                  f"{d.sparse_read / d.full_read:.2f} of a dense one")
    print(json.dumps(dict(tok_s=med, sparse=sparse)))


if __name__ == "__main__":
    main()

"""Batched decoding over an emulated link: tokens/s against the batch size, dense and Sirius.

The default model is loaded with every layer streaming through an emulated host-to-device link
of --link-gbps GB/s (link-bound: one token's weights take longer to move than to compute), and
again with every layer resident (the compute time of each batch size). For B = 1, 2, 4, 8, 16 the
first B prompts of bench/prompts.jsonl decode --new-tokens tokens each (ignore_eos, greedy),
together. Reported per mode and B:

- decode tokens/s of the batch (new tokens after each sequence's first / the decode time of the
  batch, prefill pass excluded) and its ratio to B = 1;
- predicted tokens/s: B / max(link time of a pass, resident compute time of that pass) per step,
  the pipelined schedule's model with the measured resident compute (for Sirius: per round of
  K-1 sparse steps and one full pass, with the measured tokens per round);
- for Sirius, the greedy agreement of each sequence with its dense output alone and the tokens
  committed per full pass;
- the aggregated Griffin selection's own quality: sparse-only decoding (no correction) in a
  batch of B against each prompt selecting alone, at sparsity 0.5 and 0.3 (a larger kept set).

    python bench/batch_speed.py [--link-gbps 2] [--batches 1 2 4 8 16] [--new-tokens 32] [--modes dense sirius]

Prints a table, then one JSON line.
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

import ferry

sys.path.insert(0, str(Path(__file__).parent))
from quality import PROMPTS, agreement  # noqa: E402

MODES = {"dense": {}, "sirius": dict(sparsity=0.5, period=8)}


def all_streamed_budget(plan) -> int:
    fixed = plan.kv_cache_bytes + plan.workspace_bytes + plan.norm_bytes + (plan.lm_head_bytes or plan.embed_bytes)
    return fixed + plan.prefetch_depth * plan.layer_bytes


def timed_batch(engine, prompts: list[str], n: int) -> tuple[float, list]:
    """(decode seconds of the batch, its Generations): wall time less the shared prefill pass."""
    t0 = time.perf_counter()
    results = engine.generate_batch(prompts, max_new_tokens=n, ignore_eos=True, batch_size=len(prompts))
    wall = time.perf_counter() - t0
    return wall - max(r.stats.prefill_s + r.stats.select_s for r in results), results


def measure(mode: str, batches: list[int], prompts: list[str], args) -> list[dict]:
    common = dict(device="cpu", dtype="bf16", ctx=160, progress=False, reuse_prefix=False, quant="none",
                  batch_size=max(batches), **MODES[mode])
    probe = ferry.load(**common)
    resident = probe
    streamed = ferry.load(**common, emulate_link_gbps=args.link_gbps, gpu_memory=all_streamed_budget(probe.plan))
    dense_alone = ferry.load(device="cpu", dtype="bf16", ctx=160, progress=False, reuse_prefix=False, quant="none")
    link_s = streamed.plan.link_bytes["full_pass"] / (args.link_gbps * 1e9)
    sparse_link_s = streamed.plan.link_bytes.get("sparse_step", 0) / (args.link_gbps * 1e9)
    rows, base = [], None
    for b in batches:
        batch_prompts = prompts[:b]
        timed_batch(streamed, batch_prompts, 4)  # warm-up
        decode_s, results = timed_batch(streamed, batch_prompts, args.new_tokens)
        compute_s, _ = timed_batch(resident, batch_prompts, args.new_tokens)
        tokens = sum(len(r.token_ids) - 1 for r in results)
        passes = statistics.mean(r.stats.sparse_steps + r.stats.full_passes for r in results)
        row = {"mode": mode, "batch": b, "tokens_per_s": tokens / decode_s,
               "resident_tokens_per_s": tokens / compute_s, "passes": passes}
        compute_per_pass = compute_s / max(passes, 1)
        if mode == "dense":
            step = max(link_s, compute_per_pass)
        else:  # a round: sparse steps and one full pass, each bound by its link or its compute
            full = statistics.mean(r.stats.full_passes for r in results)
            sparse = statistics.mean(r.stats.sparse_steps for r in results)
            step = (full * max(link_s, compute_per_pass) + sparse * max(sparse_link_s, compute_per_pass)) / max(passes, 1)
            row["aal"] = statistics.mean(r.stats.aal or 0 for r in results)
            alone = [dense_alone.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True).token_ids
                     for p in batch_prompts]
            row["agreement_with_dense"] = statistics.mean(agreement(r.token_ids, a) for r, a in zip(results, alone))
        row["predicted_tokens_per_s"] = tokens / (step * passes) if passes else 0.0
        base = base or row
        row["vs_batch_1"] = row["tokens_per_s"] / base["tokens_per_s"]
        rows.append(row)
        print(f"{mode:7}{b:6}{row['tokens_per_s']:10.1f}{row['vs_batch_1']:8.2f}x{row['predicted_tokens_per_s']:11.1f}"
              f"{row['resident_tokens_per_s']:11.1f}"
              + (f"{row['aal']:7.1f}{row['agreement_with_dense']:8.2f}" if mode == "sirius" else ""), flush=True)
    for engine in (streamed, resident, dense_alone):
        engine.close()
    return rows


def selection_quality(batches: list[int], prompts: list[str], args) -> list[dict]:
    """Griffin on a batch: greedy agreement with dense of sparse-only decoding (no correction,
    so the selection alone decides) when the kept neurons come from the batch's summed scores,
    against each prompt choosing its own (alone), at sparsities 0.5 and 0.3."""
    common = dict(device="cpu", dtype="bf16", ctx=160, progress=False, reuse_prefix=False, quant="none")
    dense = ferry.load(**common)
    reference = {p: dense.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True).token_ids
                 for p in prompts[:max(batches)]}
    rows = []
    for sparsity in (0.5, 0.3):
        engine = ferry.load(**common, sparsity=sparsity, mode="sparse", batch_size=max(batches))
        alone_each = [agreement(engine.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True).token_ids,
                                reference[p]) for p in prompts[:max(batches)]]
        for b in batches:
            got = engine.generate_batch(prompts[:b], max_new_tokens=args.new_tokens, ignore_eos=True, batch_size=b)
            batch = statistics.mean(agreement(g.token_ids, reference[p]) for g, p in zip(got, prompts))
            alone = statistics.mean(alone_each[:b])
            rows.append({"sparsity": sparsity, "batch": b, "agreement_batch": batch, "agreement_alone": alone})
            print(f"sparse {sparsity:4}{b:6}{batch:10.2f}{alone:10.2f}", flush=True)
        engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link-gbps", type=float, default=2.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    print(f"SmolLM2-135M-Instruct, bf16, every layer streamed over an emulated {args.link_gbps:g} GB/s link, "
          f"{args.new_tokens} new tokens per sequence; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'mode':7}{'batch':>6}{'tok/s':>10}{'vs B=1':>9}{'predicted':>11}{'resident':>11}"
          + (f"{'AAL':>7}{'agree':>8}" if "sirius" in args.modes else ""))
    rows = [row for mode in args.modes for row in measure(mode, args.batches, prompts, args)]
    print("Griffin on a batch, sparse steps only: greedy agreement with dense, mean over the batch "
          "(the first B prompts) / over the same prompts each selecting alone")
    print(f"{'sparsity':11}{'batch':>6}{'batch':>10}{'alone':>10}")
    quality = selection_quality(args.batches, prompts, args)
    print(json.dumps({"bench": "batch_speed", "link_gbps": args.link_gbps, "new_tokens": args.new_tokens,
                      "rows": rows, "selection": quality}))


if __name__ == "__main__":
    main()

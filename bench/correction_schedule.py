"""The correction scheduler against Sirius as published, over an emulated link scaled like 70B.

On a 24 GB card a 70B int4 full pass takes 100-300 times as long to cross PCIe as one resident
sparse step takes to compute. This benchmark recreates that ratio on CPU with the default model:
it times one resident sparse step, then sets the emulated link so that one full weight stream
takes `--ratio` times as long. Then, in one run, interleaved, on the same prompts:

- dense streaming (pipelined prefetch);
- Sirius as published: serial fetch-then-compute per layer, no prefetch across steps, nothing
  resident but what must be (every sparse step streams its selected rows);
- ferry pipelined with the published residency (isolates the pipelining);
- ferry pipelined, selected rows resident, without / with speculative continuation.

Reports s/token (median over runs) for the tokens after the first, the link floor beside each
(bytes the run moved per token / link bandwidth), AAL and MB/token; prints a table, one JSON line.

    python bench/correction_schedule.py [--ratio 100] [--period 8] [--runs 3] [--new-tokens 24] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ferry
from ferry.offload.planner import make_plan

PROMPTS = ["Explain why the sky is blue.", "Write a Python function that reverses a string.",
           "List three tips for better sleep.", "What is the capital of France?"]


def sparse_step_seconds(engine) -> float:
    """Median time of one sparse decode step with every weight resident (no link)."""
    times = []
    for prompt in PROMPTS[:2]:
        r = engine.generate(prompt, max_new_tokens=17, ignore_eos=True)
        times.append(r.stats.decode_s / (r.stats.new_tokens - 1))
    return statistics.median(times)


def budgets(engine, sparsity: float) -> tuple[int, int]:
    """Device budgets where every layer streams: with the slots only, and with room for every
    layer's selected rows beside them (not a byte more)."""
    plan = make_plan(engine.model, dtype_bytes=2, budget_bytes=1 << 40, host_available_bytes=1 << 40,
                     ctx=256, sparsity=sparsity)
    fixed = plan.kv_cache_bytes + plan.workspace_bytes + plan.norm_bytes + (plan.lm_head_bytes or plan.embed_bytes)
    streamed = fixed + plan.prefetch_depth * plan.layer_bytes + 1024
    return streamed, streamed + plan.num_layers * plan.prefix_bytes


def timed(engine, prompt: str, new_tokens: int) -> dict:
    """Decode s/token and link bytes after the first token (prefill and selection excluded)."""
    stream = engine.stream(prompt, max_new_tokens=new_tokens, ignore_eos=True)
    next(stream)
    before, t0 = engine.runtime.link.stats(), time.perf_counter()
    for _ in stream:
        pass
    elapsed, moved = time.perf_counter() - t0, engine.runtime.link.stats().minus(before)
    s = stream.result.stats
    return {"s": elapsed / (s.new_tokens - 1), "bytes": moved.bytes / (s.new_tokens - 1), "aal": s.aal,
            "kept": s.speculative_kept, "passes": s.full_passes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=100.0,
                        help="full weight stream time / resident sparse step time (100-300 for 70B int4 on 24 GB)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = ferry.load(device="cpu", ctx=256, progress=False, reuse_prefix=False, quant="none", sparsity=args.sparsity, mode="sparse")
    step_s = sparse_step_seconds(probe)
    stream_budget, prefix_budget = budgets(probe, args.sparsity)
    full_bytes = probe.model.num_layers * probe.plan.layer_bytes
    probe.close()
    gbps = full_bytes / (args.ratio * step_s) / 1e9
    # All layers stream; with room for every layer's selected rows beside the slots.
    common = dict(device="cpu", ctx=256, progress=False, reuse_prefix=False, quant="none", emulate_link_gbps=gbps)
    sirius = dict(common, sparsity=args.sparsity, period=args.period)
    engines = {
        "dense streaming": ferry.load(**common, gpu_memory=stream_budget),
        "sirius published": ferry.load(**sirius, gpu_memory=stream_budget, schedule="serial", resident_sparse=False,
                                       speculate=False),
        "ferry, published residency": ferry.load(**sirius, gpu_memory=stream_budget, resident_sparse=False,
                                                 speculate=False),
        "ferry pipelined": ferry.load(**sirius, gpu_memory=prefix_budget, speculate=False),
        "ferry + speculation": ferry.load(**sirius, gpu_memory=prefix_budget, speculate=True),
    }
    for name, engine in engines.items():
        plan = engine.plan
        assert len(plan.streamed_layers) == engine.model.num_layers, name
        resident_rows = name in ("ferry pipelined", "ferry + speculation")
        assert len(plan.prefix_layers) == (engine.model.num_layers if resident_rows else 0), name
    print(f"SmolLM2-135M-Instruct bf16, CPU ({torch.get_num_threads()} threads); resident sparse step "
          f"{step_s * 1e3:.1f} ms; full weight stream {full_bytes / 1e6:.0f} MB over an emulated "
          f"{gbps:.3f} GB/s link = {args.ratio:g}x a sparse step; sparsity {args.sparsity}, K={args.period}")
    rows: dict[str, list[dict]] = {name: [] for name in engines}
    for run in range(args.runs):
        order = list(engines) if run % 2 == 0 else list(reversed(engines))
        for name in order:
            rows[name].append(timed(engines[name], PROMPTS[run % len(PROMPTS)], args.new_tokens))
            print(f"  run {run + 1}/{args.runs} {name}: {rows[name][-1]['s']:.3f} s/token", flush=True)
    summary = {}
    print(f"{'':28}{'s/token':>9}{'floor s':>9}{'MB/token':>10}{'AAL':>6}{'vs published':>14}")
    published = statistics.median(r["s"] for r in rows["sirius published"])
    for name, runs in rows.items():
        s = statistics.median(r["s"] for r in runs)
        b = statistics.mean(r["bytes"] for r in runs)
        aals = [r["aal"] for r in runs if r["aal"]]
        aal = statistics.mean(aals) if aals else None
        summary[name] = {"s_per_token": s, "floor_s": b / (gbps * 1e9), "bytes_per_token": b, "aal": aal,
                         "speculation_kept": sum(r["kept"] for r in runs), "full_passes": sum(r["passes"] for r in runs),
                         "speedup_vs_published": published / s}
        print(f"{name:28}{s:9.3f}{b / (gbps * 1e9):9.3f}{b / 1e6:10.1f}{(f'{aal:6.2f}' if aal else '     -')}"
              f"{published / s:13.2f}x")
    print(json.dumps({"bench": "correction_schedule", "ratio": args.ratio, "sparse_step_s": step_s,
                      "link_gbps": gbps, "sparsity": args.sparsity, "period": args.period, "runs": args.runs,
                      "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "modes": summary}))
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()

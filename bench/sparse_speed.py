"""Dense streaming vs sparse vs Sirius over the emulated link, on the default model, in one run.

Every engine gets the same device budget (most weights stream through an emulated host-to-device
link on CPU). Reports decode s/token (median over prompts and runs), bytes moved per committed
token, AAL and the link floor (bytes per token / link bandwidth). Prints a table, one JSON line.

    python bench/sparse_speed.py [--link-gbps 4] [--gpu-memory 120MiB] [--sparsity 0.5] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import ferry

PROMPTS = ["Explain why the sky is blue.", "Write a Python function that reverses a string.",
           "What is 17 times 3?", "List three tips for better sleep."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link-gbps", type=float, default=4.0)
    parser.add_argument("--gpu-memory", default="120MiB")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--period", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    common = dict(device="cpu", ctx=256, progress=False, reuse_prefix=False, gpu_memory=args.gpu_memory, emulate_link_gbps=args.link_gbps)
    engines = {
        "dense": ferry.load(**common),
        "sparse": ferry.load(**common, sparsity=args.sparsity, mode="sparse"),
        "sirius": ferry.load(**common, sparsity=args.sparsity, period=args.period),
        "sirius strict": ferry.load(**common, sparsity=args.sparsity, period=args.period, accept="strict"),
        "sirius auto": ferry.load(**common, sparsity=args.sparsity, period="auto", max_period=args.period),
    }
    rows: dict[str, dict[str, list[float]]] = {n: {"s": [], "bytes": [], "aal": []} for n in engines}
    for run in range(args.runs):
        for name in (list(engines) if run % 2 == 0 else list(reversed(engines))):
            for prompt in PROMPTS:
                r = engines[name].generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
                rows[name]["s"].append(r.stats.decode_s / max(1, r.stats.new_tokens - 1))
                rows[name]["bytes"].append(r.stats.h2d_bytes / r.stats.new_tokens)
                if r.stats.aal is not None:
                    rows[name]["aal"].append(r.stats.aal)
    plan = engines["sirius"].plan
    print(f"SmolLM2-135M-Instruct bf16, CPU ({torch.get_num_threads()} threads), emulated link "
          f"{args.link_gbps} GB/s, budget {args.gpu_memory}, sparsity {args.sparsity}, K={args.period}; "
          f"sirius plan: {len(plan.prefix_layers)} of {len(plan.streamed_layers)} streamed layers keep "
          f"their selected rows resident")
    print(f"{'mode':14}{'ms/token':>10}{'MB/token':>10}{'floor ms':>10}{'AAL':>7}")
    summary = {}
    for name, r in rows.items():
        s, b = statistics.median(r["s"]), statistics.mean(r["bytes"])
        aal = statistics.mean(r["aal"]) if r["aal"] else None
        summary[name] = {"s_per_token": s, "bytes_per_token": b, "floor_s": b / (args.link_gbps * 1e9), "aal": aal}
        print(f"{name:14}{s * 1e3:10.1f}{b / 1e6:10.1f}{b / args.link_gbps / 1e6:10.1f}"
              f"{(f'{aal:7.2f}' if aal else '      -')}")
    ratio = summary["dense"]["s_per_token"] / summary["sirius"]["s_per_token"]
    print(f"sirius vs dense streaming: {ratio:.2f}x (s/token, higher is faster)")
    print(json.dumps({"bench": "sparse_speed", "link_gbps": args.link_gbps, "gpu_memory": args.gpu_memory,
                      "sparsity": args.sparsity, "period": args.period, "runs": args.runs,
                      "prompts": len(PROMPTS), "new_tokens": args.new_tokens, "modes": summary,
                      "speedup_sirius_vs_dense": ratio}))
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()

"""Streaming over an emulated link on CPU: serial vs pipelined s/token next to the link floor.

The default model is loaded with a device budget that forces most layers to stream through an
emulated host-to-device link of --link-gbps GB/s (a worker thread, throttled). The floor is
bytes per token / link bandwidth; a perfect pipeline reaches max(floor, compute). All schedules
run in the same process, interleaved, medians of --runs. Prints a table, then one JSON line.

    python bench/offload_stream.py [--link-gbps 4] [--gpu-memory 95MiB] [--runs 5] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

import ferry

PROMPT = "Explain in two sentences why the sky is blue."


def per_token(engine, n: int) -> tuple[float, dict]:
    """Decode seconds per token (prefill excluded) and the generation's link stats."""
    result = engine.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
    return result.stats.decode_s / max(1, n - 1), vars(result.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link-gbps", type=float, default=4.0)
    parser.add_argument("--gpu-memory", default="95MiB")
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(device="cpu", ctx=256, progress=False, reuse_prefix=False, quant="none")
    engines = {
        "resident": ferry.load(**common),
        "serial": ferry.load(**common, gpu_memory=args.gpu_memory, emulate_link_gbps=args.link_gbps,
                             prefetch_depth=args.prefetch_depth, schedule="serial"),
        "pipelined": ferry.load(**common, gpu_memory=args.gpu_memory, emulate_link_gbps=args.link_gbps,
                                prefetch_depth=args.prefetch_depth, schedule="pipelined"),
    }
    for engine in engines.values():
        per_token(engine, 4)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in engines}
    last: dict[str, dict] = {}
    for run in range(args.runs):
        names = list(engines) if run % 2 == 0 else list(reversed(engines))
        for name in names:
            seconds, stats = per_token(engines[name], args.new_tokens)
            times[name].append(seconds)
            last[name] = stats
    plan = engines["pipelined"].plan
    bytes_per_token = plan.link_bytes["full_pass"]
    floor = bytes_per_token / (args.link_gbps * 1e9)
    compute = statistics.median(times["resident"])
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"SmolLM2-135M-Instruct bf16 on CPU ({platform.machine()}, {torch.get_num_threads()} threads), "
          f"emulated link {args.link_gbps} GB/s, budget {args.gpu_memory}: "
          f"{len(plan.streamed_layers)} of {len(plan.resident_layers) + len(plan.streamed_layers)} layers "
          f"stream, {bytes_per_token / 1e6:.1f} MB/token; median of {args.runs}")
    print(f"link floor {floor * 1e3:.1f} ms/token; resident compute {compute * 1e3:.1f} ms/token; "
          f"ideal pipeline {max(floor, compute) * 1e3:.1f}, ideal serial {(floor + compute) * 1e3:.1f}")
    print(f"{'schedule':12}{'ms/token':>10}{'x floor':>9}{'link GB/s':>11}{'overlap':>9}")
    for name in engines:
        s = last[name]
        print(f"{name:12}{med[name] * 1e3:10.1f}{med[name] / floor:9.2f}{s['h2d_gbps']:11.2f}{s['overlap']:9.2f}")
    print(f"pipelined is {med['serial'] / med['pipelined']:.2f}x faster than serial")
    print(json.dumps({
        "bench": "offload_stream", "model": "SmolLM2-135M-Instruct", "device": "cpu",
        "threads": torch.get_num_threads(), "link_gbps": args.link_gbps, "gpu_memory": args.gpu_memory,
        "streamed_layers": len(plan.streamed_layers), "bytes_per_token": bytes_per_token,
        "floor_s_per_token": floor, "resident_s_per_token": compute,
        "serial_s_per_token": med["serial"], "pipelined_s_per_token": med["pipelined"],
        "pipelined_overlap": last["pipelined"]["overlap"], "pipelined_link_gbps": last["pipelined"]["h2d_gbps"],
        "speedup_pipelined_vs_serial": med["serial"] / med["pipelined"], "runs": args.runs,
    }))
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()

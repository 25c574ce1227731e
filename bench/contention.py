"""Decode speed under CPU contention: ferry vs transformers, quiet and beside busy processes.

Why: on a machine where another process keeps a core busy, OpenMP worker teams that spin at
their barriers lose their time slices to it and every parallel region then waits a scheduler
tick for the descheduled member. A runtime that launches many small parallel regions per token
suffers more than one that launches few. This bench measures each engine's slowdown under
load on the embedded default model (same process, same prompt, greedy, fixed length), runs
interleaved quiet/loaded and ferry/transformers so drift hits all alike, median of a few runs.

"ferry" is the default (`threads="auto"`: each generation runs torch's team sized to the cores
other processes leave free, `ferry.kernels.threads.fitted_threads`); "ferry fixed" pins torch's
thread count (`threads=N`, N = torch's count), what ferry did before the fitting was wired in.
The load is `--busy` subprocesses each spinning in pure Python (one core each, no OpenMP).
Prints the thread settings, a table, the slowdown of each under load, then one JSON line.

    python bench/contention.py [--runs 3] [--new-tokens 32] [--busy 1] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from decode_speed import PROMPT, load_pair  # the same model, prompt and loading, side by side
import ferry
from ferry.kernels.threads import thread_settings

SPIN = "import time\nwhile True:\n    sum(range(1000))\n"


def start_load(n: int) -> list[subprocess.Popen]:
    """n pure-Python spinners: each keeps one core busy, as a colleague's test run would."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN], env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(n)]
    time.sleep(0.5)  # let them reach the loop before timing starts
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=10)


def time_ferry(engine, n: int) -> float:
    t0 = time.perf_counter()
    engine.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
    return n / (time.perf_counter() - t0)


def time_hf(model, ids: torch.Tensor, n: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, attention_mask=torch.ones_like(ids))
    return n / (time.perf_counter() - t0)


def measure(engine, fixed, hf, ids, n: int, runs: int, busy: int) -> dict[str, list[float]]:
    """tok/s per (engine, condition), quiet and loaded interleaved run by run."""
    timers = {"ferry": lambda: time_ferry(engine, n), "ferry_fixed": lambda: time_ferry(fixed, n),
              "hf": lambda: time_hf(hf, ids, n)}
    rates: dict[str, list[float]] = {f"{w}_{c}": [] for c in ("quiet", "load") for w in timers}
    for run in range(runs):
        conditions = ("quiet", "load") if run % 2 == 0 else ("load", "quiet")
        for cond in conditions:
            procs = start_load(busy) if cond == "load" else []
            try:
                order = list(timers) if run % 2 == 0 else list(reversed(timers))
                for who in order:
                    rates[f"{who}_{cond}"].append(timers[who]())
            finally:
                stop_load(procs)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--busy", type=int, default=1, help="competing busy processes")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    engine, hf, ids = load_pair(args.dtype)
    fixed = ferry.load(dtype=args.dtype, device="cpu", progress=False, reuse_prefix=False, quant="none",
                       threads=torch.get_num_threads())
    n = args.new_tokens
    time_ferry(engine, n), time_ferry(fixed, n), time_hf(hf, ids, n)  # warm-up: first-call costs out
    load_before = os.getloadavg()[0]
    rates = measure(engine, fixed, hf, ids, n, args.runs, args.busy)
    med = {k: statistics.median(v) for k, v in rates.items()}
    slow = {w: med[f"{w}_quiet"] / med[f"{w}_load"] for w in ("ferry", "ferry_fixed", "hf")}
    settings = thread_settings()
    print(f"SmolLM2-135M-Instruct, {args.dtype}, CPU ({os.cpu_count()} cores), {n} new tokens, "
          f"median of {args.runs} interleaved runs, load average before: {load_before:.2f}")
    print("threads: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print(f"{'tok/s':14}{'quiet':>10}{f'{args.busy} busy':>10}{'slowdown':>10}")
    for w, label in (("ferry", "ferry"), ("ferry_fixed", "ferry fixed"), ("hf", "transformers")):
        print(f"{label:14}{med[f'{w}_quiet']:10.2f}{med[f'{w}_load']:10.2f}{slow[w]:10.2f}")
    print(f"ferry/transformers: quiet {med['ferry_quiet'] / med['hf_quiet']:.2f}, "
          f"loaded {med['ferry_load'] / med['hf_load']:.2f}")
    print(json.dumps({
        "bench": "contention", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "device": "cpu",
        "cores": os.cpu_count(), "busy_processes": args.busy, "new_tokens": n, "runs": args.runs,
        "load_average_before": round(load_before, 2), "threads": settings,
        **{f"{k}_tokens_per_s": round(v, 2) for k, v in med.items()},
        "ferry_slowdown": round(slow["ferry"], 3), "ferry_fixed_slowdown": round(slow["ferry_fixed"], 3),
        "transformers_slowdown": round(slow["hf"], 3),
        "all_runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
    }))


if __name__ == "__main__":
    main()

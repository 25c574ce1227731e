"""Soak: does memory grow with tokens or with prompts? RSS over one long generation and many prompts.

Why: a leak of a few KB per token or per request is invisible in a 64-token benchmark and fatal
in a server that runs for days. Two phases on the embedded default model, in one process:

1. one generation of `--tokens` new tokens (streamed; RSS sampled every `--every` tokens);
2. `--prompts` short generations of different prompts (RSS sampled after each).

The slope of a least-squares line through the samples (after the first quarter, so warm-up
allocations and first-call caches do not count as a leak) is reported in bytes
per token and bytes per prompt. The KV cache is sized once (ctx) and zeroed when
allocated, so its pages are resident from the start: a steady slope in either phase is a leak
(the per-token KV size is printed for scale). Prints a table, then one JSON line.

    python bench/soak.py [--tokens 2000] [--prompts 100] [--prompt-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import psutil
import torch

import ferry
from ferry.kernels.threads import thread_settings

TOPICS = ["a lighthouse keeper", "a lost key", "the first snow", "a robot gardener", "an old map",
          "a night train", "a bakery at dawn", "a chess match", "a river crossing", "a broken clock"]


def rss() -> int:
    return psutil.Process().memory_info().rss


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, skipping the first quarter (warm-up)."""
    skip = len(xs) // 4
    xs, ys = xs[skip:], ys[skip:]
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def long_generation(engine, tokens: int, every: int) -> tuple[list[int], list[int], float]:
    """(token counts, RSS samples, seconds) over one generation of `tokens` new tokens."""
    counts, samples = [0], [rss()]
    t0 = time.perf_counter()
    stream = engine.stream("Tell a very long story about " + TOPICS[0] + ".", max_new_tokens=tokens,
                           ignore_eos=True)
    n = 0
    for tok in stream:
        if tok.id is None:
            continue
        n += 1
        if n % every == 0:
            counts.append(n)
            samples.append(rss())
    return counts, samples, time.perf_counter() - t0


def many_prompts(engine, prompts: int, new_tokens: int) -> tuple[list[int], list[int], float]:
    """(prompt counts, RSS samples, seconds) over `prompts` different short generations."""
    counts, samples = [0], [rss()]
    t0 = time.perf_counter()
    for i in range(prompts):
        prompt = f"Request {i}: write two sentences about {TOPICS[i % len(TOPICS)]}."
        engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        counts.append(i + 1)
        samples.append(rss())
    return counts, samples, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--every", type=int, default=50, help="sample RSS every this many tokens")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="new tokens per prompt")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    engine = ferry.load(dtype=args.dtype, device="cpu", progress=False, reuse_prefix=False, quant="none",
                        ctx=args.tokens + 256)
    engine.generate("Warm up.", max_new_tokens=4)
    loaded = rss()
    t_counts, t_rss, t_s = long_generation(engine, args.tokens, args.every)
    p_counts, p_rss, p_s = many_prompts(engine, args.prompts, args.prompt_tokens)
    per_token, per_prompt = slope(t_counts, t_rss), slope(p_counts, p_rss)
    m = engine.runtime.model  # for scale: what a per-token leak of one KV entry would look like
    kv_per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * engine.runtime.dtype.itemsize
    mib = 1 << 20
    print(f"for scale: one position of the KV cache is {kv_per_token} B (allocated and zeroed up front)")
    print(f"SmolLM2-135M-Instruct, {args.dtype}, CPU ({os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads); RSS after load and warm-up {loaded / mib:.1f} MiB")
    print(f"{'phase':30}{'start MiB':>11}{'end MiB':>10}{'peak MiB':>10}{'slope':>16}{'s':>8}")
    print(f"{f'1 generation, {args.tokens} tokens':30}{t_rss[0] / mib:11.1f}{t_rss[-1] / mib:10.1f}"
          f"{max(t_rss) / mib:10.1f}{f'{per_token:.0f} B/token':>16}{t_s:8.1f}")
    print(f"{f'{args.prompts} prompts x {args.prompt_tokens} tokens':30}{p_rss[0] / mib:11.1f}"
          f"{p_rss[-1] / mib:10.1f}{max(p_rss) / mib:10.1f}{f'{per_prompt:.0f} B/prompt':>16}{p_s:8.1f}")
    print(json.dumps({
        "bench": "soak", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "device": "cpu",
        "threads": thread_settings(), "tokens": args.tokens, "prompts": args.prompts,
        "prompt_new_tokens": args.prompt_tokens, "rss_loaded_bytes": loaded,
        "rss_tokens_start_bytes": t_rss[0], "rss_tokens_end_bytes": t_rss[-1],
        "rss_prompts_start_bytes": p_rss[0], "rss_prompts_end_bytes": p_rss[-1],
        "kv_cache_bytes_per_token": kv_per_token, "bytes_per_token": round(per_token, 1),
        "bytes_per_prompt": round(per_prompt, 1),
        "tokens_s": round(t_s, 1), "prompts_s": round(p_s, 1),
    }))


if __name__ == "__main__":
    main()

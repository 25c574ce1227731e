"""Dense decode speed: ferry vs transformers' generate on the embedded default model.

Same process, same dtype, same prompt, greedy, fixed length (end-of-sequence ignored); runs are
interleaved so machine noise hits both alike. Prints a table, then one JSON line.

    python bench/decode_speed.py [--runs 7] [--new-tokens 64] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import ferry

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
    """ferry and transformers on the default model, same dtype; and the prompt's ids."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    engine = ferry.load(dtype=dtype_name, device="cpu", progress=False, reuse_prefix=False)
    hf = AutoModelForCausalLM.from_pretrained(engine.runtime.folder, dtype=dtype).eval()
    return engine, hf, torch.tensor([engine.encode(PROMPT)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    engine, hf, ids = load_pair(args.dtype)
    n = args.new_tokens
    time_ferry(engine, n), time_hf(hf, ids, n)  # warm-up: first-call costs out of the figures
    ferry_total, ferry_decode, hf_total, hf_decode = [], [], [], []
    for run in range(args.runs):
        order = ("ferry", "hf") if run % 2 == 0 else ("hf", "ferry")
        for who in order:
            if who == "ferry":
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
    print(f"SmolLM2-135M-Instruct, {args.dtype}, CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {n} new tokens, median of {args.runs} interleaved runs")
    print(f"{'':14}{'end-to-end tok/s':>18}{'decode tok/s':>14}")
    print(f"{'ferry':14}{f_tps:18.1f}{f_dec:14.1f}")
    print(f"{'transformers':14}{h_tps:18.1f}{h_dec:14.1f}")
    print(f"{'ratio':14}{f_tps / h_tps:18.2f}{f_dec / h_dec:14.2f}")
    print(f"greedy tokens identical for the first {agree} of {n}")
    print(json.dumps({
        "bench": "decode_speed", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "device": "cpu",
        "threads": torch.get_num_threads(), "new_tokens": n, "runs": args.runs,
        "ferry_tokens_per_s": round(f_tps, 2), "transformers_tokens_per_s": round(h_tps, 2),
        "ferry_decode_tokens_per_s": round(f_dec, 2), "transformers_decode_tokens_per_s": round(h_dec, 2),
        "ratio_end_to_end": round(f_tps / h_tps, 3), "ratio_decode": round(f_dec / h_dec, 3),
        "greedy_agreement_tokens": agree,
    }))


if __name__ == "__main__":
    main()

"""Quality of sparse decoding with and without correction, on the default model.

Over the prompts in bench/prompts.jsonl (math, facts, code, instructions), greedy, chat template:
dense, sparse (no correction) and sirius at several sparsities, periods and thresholds. For each:
agreement with dense greedy (fraction of tokens before the first divergence), mean NLL of the
generated continuation under the full model, AAL, effective density (parameters read per token
relative to dense), corrected fraction. Prints a table, then one JSON line.

    python bench/quality.py [--new-tokens 32] [--limit N] [--sparsities 0.3 0.5 0.7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ferry

PROMPTS = Path(__file__).parent / "prompts.jsonl"


def continuation_nll(engine, prompt: str, tokens: list[int]) -> float:
    """Mean negative log-likelihood of `tokens` after the prompt under the full model."""
    ids = engine.encode(prompt)
    logits = engine.logits(ids + tokens).cpu()
    logp = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)
    return float(-logp.gather(1, torch.tensor(tokens)[:, None]).mean())


def agreement(tokens: list[int], reference: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return same / max(1, len(reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--periods", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows][: args.limit or None]
    configs = [("dense", {})]
    configs += [(f"sparse s={s}", dict(sparsity=s, mode="sparse")) for s in args.sparsities]
    configs += [(f"sirius s={s} K={k} t={t}", dict(sparsity=s, period=k, threshold=t))
                for s in args.sparsities for k in args.periods for t in args.thresholds]
    common = dict(dtype=args.dtype, device="cpu", ctx=512, progress=False, reuse_prefix=False, quant="none")
    dense = ferry.load(**common)
    reference = [dense.generate(p, max_new_tokens=args.new_tokens).token_ids for p in prompts]
    results = []
    print(f"{len(prompts)} prompts, {args.new_tokens} new tokens, greedy, {args.dtype}, CPU")
    print(f"{'config':26}{'agree':>7}{'NLL':>7}{'AAL':>6}{'eff.dens':>9}{'corrected':>10}{'min':>6}")
    for name, options in configs:
        engine = dense if not options else ferry.load(**common, **options)
        t0 = time.perf_counter()
        agree, nll, aal, eff, corr = [], [], [], [], []
        for prompt, ref in zip(prompts, reference):
            out = engine.generate(prompt, max_new_tokens=args.new_tokens)
            agree.append(agreement(out.token_ids, ref))
            nll.append(continuation_nll(dense, prompt, out.token_ids))
            eff.append(out.stats.effective_density)
            corr.append(out.stats.corrected_fraction)
            if out.stats.aal is not None:
                aal.append(out.stats.aal)
        row = {"config": name, **options, "agreement": statistics.mean(agree), "nll": statistics.mean(nll),
               "aal": statistics.mean(aal) if aal else None, "effective_density": statistics.mean(eff),
               "corrected_fraction": statistics.mean(corr), "minutes": (time.perf_counter() - t0) / 60}
        results.append(row)
        aal_text = f"{row['aal']:6.2f}" if row["aal"] is not None else f"{'-':>6}"
        print(f"{name:26}{row['agreement']:7.3f}{row['nll']:7.3f}{aal_text}{row['effective_density']:9.2f}"
              f"{row['corrected_fraction']:10.3f}{row['minutes']:6.1f}", flush=True)
        if engine is not dense:
            engine.close()
    print(json.dumps({"bench": "quality", "model": "SmolLM2-135M-Instruct", "prompts": len(prompts),
                      "new_tokens": args.new_tokens, "dtype": args.dtype, "results": results}))


if __name__ == "__main__":
    main()

"""Quantized host weights on the default model: bytes on the link and quality against bf16.

For each of bf16 (no quantization), int8 and int4, over the prompts in bench/prompts.jsonl
(chat template, greedy, dense decoding, bf16 compute on CPU):

- bytes per token: the plan's figure with every layer streamed (the ceiling the link must carry,
  printed first) and the measured `h2d_bytes_per_token` of generations with every layer streamed;
- NLL: as bench/quality.py, the mean negative log-likelihood of each configuration's greedy
  continuation under the bf16 model ("does it say what bf16 would say"), and the other way round,
  the NLL the quantized model gives the bf16 continuation ("how well does it predict bf16's text");
- text NLL: mean NLL per token of natural text neither model wrote (ferry's calibration text, in
  chunks of 256 tokens), the usual perplexity-style measure of what quantization costs;
- agreement: fraction of tokens before the first divergence from bf16 dense greedy;
- decode tokens/s with all layers resident.

Prints a table, then one JSON line.

    python bench/quant_quality.py [--new-tokens 32] [--limit N] [--stream-prompts 4] [--methods none auto int4:64]

Methods: none (bf16: the GGUF's values, dequantized), auto (the GGUF's own 4-bit groups kept),
int8 or int4 with an optional group size (int4:64) and ":plain" for plain min/max ranges instead
of fitted ones; any with ":head-bf16" (lm_head left in bf16; by default it is int8 when the layers
are quantized) or ":dequant" (resident layers dequantized per use instead of the packed kernel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import ferry
from ferry.model import packed

sys.path.insert(0, str(Path(__file__).parent))
from quality import PROMPTS, agreement, continuation_nll  # noqa: E402

METHODS = ("none", "auto", "int8", "int8:plain", "int4:32", "int4:32:plain", "int4:64", "int4:128",
           "int4:128:plain")
TEXT = Path(ferry.__file__).parent / "sparse" / "calibration.txt"
CHUNK = 256


def text_nll(engine) -> float:
    """Mean NLL per predicted token of the calibration text, in independent chunks."""
    ids = engine.tokenizer(TEXT.read_text(encoding="utf-8"))["input_ids"]
    total, count = 0.0, 0
    for lo in range(0, len(ids) - 1, CHUNK):
        chunk = torch.tensor(ids[lo:lo + CHUNK], dtype=torch.long)
        logits = engine.logits(chunk.tolist()).cpu()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, chunk[1:, None])
        total, count = total - float(logp.sum()), count + len(chunk) - 1
    return total / count


def all_streamed_budget(engine) -> int:
    """A device budget that keeps no layer resident: fixed costs plus the streaming slots."""
    p = engine.plan
    fixed = p.kv_cache_bytes + p.workspace_bytes + p.norm_bytes + (p.lm_head_bytes or p.embed_bytes)
    return fixed + p.prefetch_depth * p.layer_bytes


def quant_options(method: str) -> dict:
    """none, auto (the source's own bits), or int8/int4[:GROUP][:plain] (plain: no range fitting);
    any of them with :head-bf16 (lm_head not quantized)."""
    name, *rest = method.split(":")
    options = dict(quant=name)
    if "head-bf16" in rest:
        options["quant_lm_head"] = "none"
    if name in ("none", "auto"):
        return options
    options["quant_fit"] = "plain" not in rest
    groups = [int(r) for r in rest if r.isdigit()]
    return {**options, "quant_group": groups[0]} if groups else options


def load(method: str, **options):
    """An engine for a method; with :dequant its resident layers skip the packed int4 kernel."""
    packed.ENABLED = False if "dequant" in method.split(":") else None
    try:
        return ferry.load(**options, **quant_options(method))
    finally:
        packed.ENABLED = None


def streamed_bytes(method: str, budget: int, prompts: list[str], new_tokens: int, common: dict) -> tuple[float, int, int]:
    """(measured bytes per new token, the plan's bytes per dense token, streamed layers)."""
    engine = load(method, **common, gpu_memory=budget, emulate_link_gbps=1000.0)
    per_token = [engine.generate(p, max_new_tokens=new_tokens, ignore_eos=True).stats.h2d_bytes_per_token
                 for p in prompts]
    out = statistics.mean(per_token), engine.plan.link_bytes["full_pass"], len(engine.plan.streamed_layers)
    engine.close()
    return out


def evaluate(engine, reference_engine, prompts, reference, new_tokens) -> dict:
    agree, nll_own, nll_ref, tps = [], [], [], []
    for prompt, ref in zip(prompts, reference):
        out = engine.generate(prompt, max_new_tokens=new_tokens)
        agree.append(agreement(out.token_ids, ref))
        nll_own.append(continuation_nll(reference_engine, prompt, out.token_ids))
        nll_ref.append(continuation_nll(engine, prompt, ref))
        tps.append(out.stats.tokens_per_s)
    return {"text_nll": text_nll(engine), "agreement": statistics.mean(agree), "nll": statistics.mean(nll_own),
            "nll_of_bf16_text": statistics.mean(nll_ref), "decode_tokens_per_s": statistics.median(tps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    parser.add_argument("--stream-prompts", type=int, default=4, help="prompts for the streamed byte count")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="none, auto, int8 or int4[:GROUP][:plain]")
    args = parser.parse_args()
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows][: args.limit or None]
    common = dict(dtype="bf16", device="cpu", ctx=512, progress=False, reuse_prefix=False)
    engines = {m: load(m, **common) for m in ["none", *[m for m in args.methods if m != "none"]]}
    # The default model's source is 4-bit GGUF (Q4_1): "none" is its values dequantized to bf16.
    bf16 = engines["none"]
    reference = [bf16.generate(p, max_new_tokens=args.new_tokens).token_ids for p in prompts]
    results = []
    print(f"SmolLM2-135M-Instruct, {len(prompts)} prompts, {args.new_tokens} new tokens, greedy, bf16 compute, "
          f"CPU ({torch.get_num_threads()} threads); groups of {[e.plan.quant_group for e in engines.values()]} values")
    print(f"{'weights':15}{'plan B/tok':>12}{'measured':>12}{'vs bf16':>9}{'text NLL':>10}{'change':>9}"
          f"{'NLL':>8}{'change':>9}{'NLL(bf16 text)':>16}{'change':>9}{'agree':>7}{'tok/s':>7}")
    for method, engine in engines.items():
        t0 = time.perf_counter()
        measured, planned, streamed = streamed_bytes(method, all_streamed_budget(engine), prompts[: args.stream_prompts],
                                                     args.new_tokens, common)
        row = {"quant": method, "group": engine.plan.quant_group, "plan_bytes_per_token": planned, "h2d_bytes_per_token": measured,
               "streamed_layers": streamed, **evaluate(engine, bf16, prompts, reference, args.new_tokens)}
        base = results[0] if results else row
        row["bytes_vs_bf16"] = measured / base["h2d_bytes_per_token"]
        row["nll_change"] = row["nll"] / base["nll"] - 1
        row["nll_of_bf16_text_change"] = row["nll_of_bf16_text"] / base["nll_of_bf16_text"] - 1
        row["text_nll_change"] = row["text_nll"] / base["text_nll"] - 1
        row["minutes"] = (time.perf_counter() - t0) / 60
        results.append(row)
        print(f"{method:15}{planned / 1e6:10.1f}MB{measured / 1e6:10.1f}MB{row['bytes_vs_bf16']:9.3f}"
              f"{row['text_nll']:10.3f}{row['text_nll_change']:+9.1%}{row['nll']:8.3f}{row['nll_change']:+9.1%}{row['nll_of_bf16_text']:16.3f}"
              f"{row['nll_of_bf16_text_change']:+9.1%}{row['agreement']:7.3f}{row['decode_tokens_per_s']:7.1f}",
              flush=True)
    print(json.dumps({"bench": "quant_quality", "model": "SmolLM2-135M-Instruct", "prompts": len(prompts),
                      "new_tokens": args.new_tokens, "dtype": "bf16",
                      "results": results}))


if __name__ == "__main__":
    main()

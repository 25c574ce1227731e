"""Adaptive correction vs fixed periods on the default model, and which confidence signal to use.

Part 1 (signal study): sirius with the fixed period and P = 0 (chunks never end early), recording
for every checked draft the sparse model's confidence under each signal (probability of the chosen
token, top-1/top-2 margin, 1 - normalised entropy) and whether the full model kept it; the ROC AUC
of each signal for predicting "kept" says which one separates best.

Part 2: at each sparsity, fixed K = 8 and 16 vs --period auto (automatic P): agreement with dense
greedy, mean NLL of the continuation under the full model, AAL, effective density, wasted drafts
per token; then decode s/token over the emulated link for the same settings (all layers streamed,
selected rows resident where they fit). Table, then one JSON line.

    python bench/adaptive.py [--sparsities 0.1 0.2 0.3 0.5] [--limit 24] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import ferry
from ferry.scheduler import correction
from ferry.scheduler.adaptive import ConfidenceTuner, draft_confidence

sys.path.insert(0, str(Path(__file__).parent))
from quality import PROMPTS, agreement, continuation_nll  # noqa: E402


class Recorder(ConfidenceTuner):
    """Never ends a chunk early (P = 0); records every signal for each checked draft."""

    def __init__(self):
        super().__init__(max_drafts=1, cost_ratio=1.0, fixed=0.0)
        self.rows: list[tuple[dict, bool]] = []
        self.pending: list[dict] = []

    def observe(self, confidences, kept):
        for i, signals in enumerate(self.pending[: kept + 1]):
            self.rows.append((signals, i < kept))
        self.pending = []


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a kept draft > score of a rejected one), ties counting half."""
    pos = torch.tensor([s for s, y in zip(scores, labels) if y])
    neg = torch.tensor([s for s, y in zip(scores, labels) if not y])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + ties / 2)


def signal_study(prompts, sparsity: float, new_tokens: int) -> dict[str, float]:
    engine = ferry.load(device="cpu", ctx=512, progress=False, reuse_prefix=False, quant="none", sparsity=sparsity, period="auto",
                        max_period=16, draft_confidence=0.0)
    recorder = Recorder()
    engine.runtime.tuner = recorder
    original = correction.draft_confidence

    def spy(logits, token, signal="prob"):  # every signal for the same draft
        recorder.pending.append({s: draft_confidence(logits, token, s) for s in ("prob", "margin", "entropy")})
        return original(logits, token, signal)

    correction.draft_confidence = spy
    try:
        for prompt in prompts:
            engine.generate(prompt, max_new_tokens=new_tokens)
    finally:
        correction.draft_confidence = original
    labels = [kept for _, kept in recorder.rows]
    return {s: auc([row[s] for row, _ in recorder.rows], labels) for s in ("prob", "margin", "entropy")} | {
        "drafts": len(labels), "kept_fraction": sum(labels) / max(1, len(labels))}


def evaluate(engine, dense, prompts, reference, new_tokens):
    agree, nll, aal, eff, wasted = [], [], [], [], []
    for prompt, ref in zip(prompts, reference):
        out = engine.generate(prompt, max_new_tokens=new_tokens)
        s = out.stats
        agree.append(agreement(out.token_ids, ref))
        nll.append(continuation_nll(dense, prompt, out.token_ids))
        eff.append(s.effective_density)
        wasted.append(s.wasted_drafts / max(1, s.new_tokens))
        if s.aal is not None:
            aal.append(s.aal)
    return {"agreement": statistics.mean(agree), "nll": statistics.mean(nll),
            "aal": statistics.mean(aal) if aal else None, "effective_density": statistics.mean(eff),
            "wasted_per_token": statistics.mean(wasted),
            "draft_confidence": engine.runtime.tuner.threshold() if engine.runtime.tuner else None}


def streamed_speed(options, prompts, new_tokens, link_gbps, gpu_memory) -> float:
    engine = ferry.load(device="cpu", ctx=512, progress=False, reuse_prefix=False, quant="none", gpu_memory=gpu_memory, emulate_link_gbps=link_gbps, **options)
    times = []
    for prompt in prompts:
        r = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        times.append(r.stats.decode_s / max(1, r.stats.new_tokens - 1))
    engine.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--link-gbps", type=float, default=4.0)
    parser.add_argument("--gpu-memory", default="160MiB")
    parser.add_argument("--speed-prompts", type=int, default=4)
    args = parser.parse_args()
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows][: args.limit or None]
    study = signal_study(prompts, 0.3, args.new_tokens)
    print(f"signal study (sparsity 0.3, K=16, {study['drafts']} checked drafts, "
          f"{study['kept_fraction']:.2f} kept): ROC AUC prob {study['prob']:.3f}, "
          f"margin {study['margin']:.3f}, entropy {study['entropy']:.3f}", flush=True)
    dense = ferry.load(device="cpu", ctx=512, progress=False, reuse_prefix=False, quant="none")
    reference = [dense.generate(p, max_new_tokens=args.new_tokens).token_ids for p in prompts]
    base = evaluate(dense, dense, prompts, reference, args.new_tokens)
    dense_speed = streamed_speed({}, prompts[: args.speed_prompts], args.new_tokens, args.link_gbps, args.gpu_memory)
    results = [{"config": "dense", **base, "s_per_token": dense_speed}]
    print(f"{len(prompts)} prompts, {args.new_tokens} new tokens, greedy bf16; speed: {args.speed_prompts} "
          f"prompts over a {args.link_gbps} GB/s emulated link, budget {args.gpu_memory}")
    print(f"{'config':22}{'agree':>7}{'NLL':>7}{'dNLL%':>7}{'AAL':>6}{'eff.dens':>9}{'wasted/tok':>11}{'P':>6}{'ms/tok':>8}")

    def show(row):
        aal = f"{row['aal']:6.2f}" if row["aal"] else f"{'-':>6}"
        p = f"{row['draft_confidence']:6.2f}" if row["draft_confidence"] is not None else f"{'-':>6}"
        print(f"{row['config']:22}{row['agreement']:7.3f}{row['nll']:7.3f}{100 * (row['nll'] / base['nll'] - 1):7.1f}"
              f"{aal}{row['effective_density']:9.2f}{row['wasted_per_token']:11.2f}{p}{row['s_per_token'] * 1e3:8.1f}",
              flush=True)

    show(results[0])
    for s in args.sparsities:
        for name, options in ((f"s={s} K=8", dict(period=8)), (f"s={s} K=16", dict(period=16)),
                              (f"s={s} auto", dict(period="auto"))):
            options = dict(sparsity=s, **options)
            engine = ferry.load(device="cpu", ctx=512, progress=False, reuse_prefix=False, quant="none", **options)
            row = {"config": name, **options, **evaluate(engine, dense, prompts, reference, args.new_tokens)}
            row["s_per_token"] = streamed_speed(options, prompts[: args.speed_prompts], args.new_tokens,
                                                args.link_gbps, args.gpu_memory)
            results.append(row)
            show(row)
    print(json.dumps({"bench": "adaptive", "model": "SmolLM2-135M-Instruct", "prompts": len(prompts),
                      "new_tokens": args.new_tokens, "signal_study": study, "results": results}))


if __name__ == "__main__":
    main()

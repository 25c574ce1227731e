"""Adaptive correction: the confidence signal, the threshold tuner, and the loop's behaviour."""

from __future__ import annotations

import pytest
import torch

import ferry
from ferry.scheduler.adaptive import BINS, ConfidenceTuner, draft_confidence, expected_cost
from ferry.scheduler.correction import CorrectionConfig, decode_sirius
from ferry.scheduler.decode import DecodeStats
from helpers import EOS, PROMPTS, V, MockPasses, truth


class SoftMock(MockPasses):
    """Sparse logits whose confidence is scripted per position (1.0 unless listed)."""

    def __init__(self, full, sparse, unsure: dict[int, float], **kw):
        super().__init__(full, sparse, **kw)
        self.unsure = unsure

    def sparse_step(self, token):
        pos = self.cache.length
        logits = super().sparse_step(token)
        if pos in self.unsure:  # spread mass: the chosen token keeps about `p`
            p = self.unsure[pos]
            logits = torch.full((V,), 0.0)
            logits[self.sparse_pred.get(pos, 0)] = torch.log(torch.tensor(p * (V - 1) / (1 - p)))
        return logits


def run(passes, max_new=30, period=8, tuner=None, accept="strict"):
    stats = DecodeStats()
    cfg = CorrectionConfig(mode="sirius", period=period, accept=accept, adaptive=tuner is not None)
    out = list(decode_sirius(passes, 7, max_new, lambda l: int(l.argmax()), frozenset({EOS}), stats, cfg, tuner))
    return out, stats


def test_confidence_signals():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits, 0)
    assert draft_confidence(logits, 0, "prob") == pytest.approx(float(probs[0]))
    assert draft_confidence(logits, 0, "margin") == pytest.approx(float(probs[0] - probs[1]))
    assert 0 < draft_confidence(logits, 0, "entropy") < 1
    assert draft_confidence(torch.zeros(4), 0, "entropy") == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        draft_confidence(logits, 0, "vibes")


def test_threshold_zero_behaves_like_the_fixed_period():
    f = truth()
    s = dict(f)
    for p in (9, 14, 22):
        s[p] = (f[p] % 17) + 2
    fixed_out, fixed_stats = run(SoftMock(f, s, {8: 0.3, 12: 0.2}), period=6)
    auto_out, auto_stats = run(SoftMock(f, s, {8: 0.3, 12: 0.2}), period=6, tuner=ConfidenceTuner(5, 0.7, fixed=0.0))
    assert auto_out == fixed_out
    assert (auto_stats.full_passes, auto_stats.sparse_steps) == (fixed_stats.full_passes, fixed_stats.sparse_steps)


def test_unsure_first_draft_ends_the_chunk_at_once():
    f = truth()
    passes = SoftMock(f, dict(f), {5: 0.1})  # the very first draft is unsure
    out, stats = run(passes, max_new=3, period=16, tuner=ConfidenceTuner(15, 0.7, fixed=0.5))
    assert out == [7, f[5], f[6]]
    assert stats.full_passes == 1 and stats.drafts == 1  # checked right away, bonus appended


def test_adaptive_still_stops_at_eos_and_max_tokens():
    f = truth()
    f[7] = EOS
    out, stats = run(SoftMock(f, dict(f), {}), period=16, tuner=ConfidenceTuner(15, 0.7, fixed=0.5))
    assert out[-1] == EOS and stats.finish_reason == "stop"
    f = truth()
    out, stats = run(SoftMock(f, dict(f), {}), max_new=4, period=16, tuner=ConfidenceTuner(15, 0.7, fixed=0.5))
    assert len(out) == 4 and stats.finish_reason == "length"


def test_expected_cost_at_zero_is_the_fixed_period_formula():
    counts, kept = torch.zeros(BINS), torch.zeros(BINS)
    counts[10], kept[10] = 10, 6  # acceptance 0.6 regardless of confidence
    k, c = 7, 0.5
    drafts = k
    committed = 1 + 0.6 * sum(0.6 ** i for i in range(k))
    assert expected_cost(0.0, counts, kept, k, c) == pytest.approx((drafts * c + 1) / committed)


def test_tuner_stops_early_when_unsure_drafts_fail():
    tuner = ConfidenceTuner(15, cost_ratio=0.7)
    for _ in range(20):  # confident drafts are kept, the unsure one is rejected
        tuner.observe([0.95, 0.9, 0.85, 0.8, 0.3], kept=4)
    assert 0.3 < tuner.threshold() <= 0.8
    assert expected_cost(tuner.threshold(), tuner.counts, tuner.kept, 15, 0.7) < \
        expected_cost(0.0, tuner.counts, tuner.kept, 15, 0.7)  # cheaper than the fixed period


@pytest.mark.parametrize("confidence, schedule", [(None, "pipelined"), (0.3, "pipelined"), (None, "serial")])
def test_auto_period_strict_reproduces_dense_greedy(confidence, schedule, tiny_model_dir):
    folder = tiny_model_dir("llama3")
    dense = ferry.load(folder, dtype="fp32", ctx=64, progress=False)
    streaming = {}
    if schedule == "serial":  # every layer streams, fetched when needed
        from helpers import streaming_budget
        streaming = dict(gpu_memory=streaming_budget(dense.model, resident=0, depth=2, ctx=64), schedule="serial")
    auto = ferry.load(folder, dtype="fp32", ctx=64, progress=False, sparsity=0.5, accept="strict",
                      period="auto", draft_confidence=confidence, **streaming)
    for prompt in PROMPTS:
        want = dense.generate(prompt, max_new_tokens=24, ignore_eos=True)
        got = auto.generate(prompt, max_new_tokens=24, ignore_eos=True)
        assert got.token_ids == want.token_ids
    assert got.stats.draft_confidence is not None


def test_period_auto_cli(tiny_model_dir, capsys):
    import json

    from ferry.cli import main

    code = main(["generate", "-m", str(tiny_model_dir()), "-p", "The capital", "-n", "8", "--json",
                 "--sparsity", "0.5", "--period", "auto", "--max-period", "6", "--draft-confidence", "0.2"])
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert code == 0 and stats["draft_confidence"] == 0.2 and stats["mode"] == "sirius"
    assert main(["generate", "-p", "x", "--draft-confidence", "0.2"]) == 2  # needs --period auto
    with pytest.raises(SystemExit):
        main(["generate", "-p", "x", "--period", "sometimes"])

"""The correction loop: accept/rollback edge cases on a mock model, and strict mode = dense greedy."""

from __future__ import annotations

import pytest
import torch

import ferry
from ferry.scheduler.correction import CorrectionConfig, accepted_prefix, decode_sirius
from ferry.scheduler.decode import DecodeStats
from helpers import EOS, PROMPTS, MockPasses, truth


def run(passes, max_new=40, period=4, accept="strict", first=7):
    stats = DecodeStats()
    cfg = CorrectionConfig(mode="sirius", period=period, accept=accept)
    out = list(decode_sirius(passes, first, max_new, lambda l: int(l.argmax()), frozenset({EOS}), stats, cfg))
    return out, stats


def test_everything_accepted_commits_period_tokens_per_pass():
    f = truth()
    out, stats = run(MockPasses(f, dict(f)), max_new=13, period=4)
    assert out == [7] + [f[p] for p in range(5, 17)]
    assert stats.full_passes == 3 and stats.corrections == 0  # 12 tokens: 3 drafts + a bonus per pass
    assert stats.accepted == stats.drafts == 9
    assert stats.finish_reason == "length"


def test_first_draft_rejected_every_time():
    f = truth()
    wrong = {p: (t % 17) + 2 for p, t in f.items()}  # always differs from the full model
    passes = MockPasses(f, wrong)
    out, stats = run(passes, max_new=6, period=4)
    assert out == [7] + [f[p] for p in range(5, 10)]
    assert stats.full_passes == 5 and stats.corrections == 5 and stats.accepted == 0
    assert passes.cache.length == 5 + 5  # rolled back to just after each correction's predecessor


def test_rejection_in_the_middle_rolls_back_to_the_kept_prefix():
    f = truth()
    s = dict(f)
    s[6] = (f[6] % 17) + 2  # the second draft of the first chunk is wrong
    passes = MockPasses(f, s)
    out, stats = run(passes, max_new=3, period=4)
    assert out == [7, f[5], f[6]]  # kept draft, then the full model's correction
    assert stats.drafts == 2 and stats.accepted == 1 and stats.corrections == 1
    assert s[6] not in out[2:]


def test_eos_drafted_and_confirmed_ends_generation():
    f = truth()
    f[6] = EOS
    out, stats = run(MockPasses(f, dict(f)), period=8)
    assert out == [7, f[5], EOS]
    assert stats.finish_reason == "stop" and stats.drafts == 2  # nothing drafted past EOS


def test_eos_drafted_but_rejected_never_appears():
    f = truth()
    s = dict(f)
    s[6] = EOS
    out, stats = run(MockPasses(f, s), max_new=6, period=8)
    assert EOS not in out
    assert out == [7] + [f[p] for p in range(5, 10)]


def test_max_tokens_inside_a_chunk_are_all_checked():
    f = truth()
    passes = MockPasses(f, dict(f))
    out, stats = run(passes, max_new=5, period=16)
    assert len(out) == 5 and stats.finish_reason == "length"
    assert stats.drafts == 4 and stats.full_passes == 1  # no bonus token beyond the limit
    for pos, token in zip(range(5, 10), out):  # the full model saw every committed token
        assert passes.checked_at[pos] == token


def test_chunk_reaching_the_end_of_the_context():
    f = truth()
    passes = MockPasses(f, dict(f), capacity=9)
    out, stats = run(passes, max_new=50, period=16)
    assert stats.finish_reason == "context"
    assert len(out) == 9 - 5 + 1  # positions 5..8 are written; the last token needs no slot
    assert passes.cache.length == 9


def test_threshold_is_an_absolute_probability():
    logits = torch.tensor([[0.0, 0.0, 5.0, 5.0], [9.0, 0.0, 0.0, 0.0]])
    loose = CorrectionConfig(mode="sirius", threshold=0.1)
    assert accepted_prefix(logits, [3, 0], loose) == 2  # p = 0.5 and ~1.0
    assert accepted_prefix(logits, [3, 0], CorrectionConfig(mode="sirius", threshold=0.6)) == 0
    assert accepted_prefix(logits, [3, 0], CorrectionConfig(mode="sirius", accept="strict")) == 0
    assert accepted_prefix(logits, [2, 0], CorrectionConfig(mode="sirius", accept="strict")) == 2


@pytest.mark.parametrize("bad", [dict(period=0), dict(threshold=2.0), dict(mode="turbo"), dict(accept="maybe")])
def test_correction_config_rejects(bad):
    with pytest.raises(ferry.FerryError):
        CorrectionConfig(**bad)




@pytest.mark.parametrize("family", ["llama3", "qwen2"])
@pytest.mark.parametrize("options", [
    dict(sparsity=0.5, accept="strict", period=4),
    dict(sparsity=0.7, accept="strict", period=16),
    dict(sparsity=0.5, accept="strict", sparse_method="cats"),
    dict(sparsity=0.5, accept="strict", stream="slots"),
    dict(sparsity=0.5, accept="strict", stream="prefixes", emulate_link_gbps=50.0),
])
def test_strict_mode_reproduces_dense_greedy_on_tiny_models(family, options, tiny_model_dir):
    folder = tiny_model_dir(family)
    dense = ferry.load(folder, dtype="fp32", ctx=64, progress=False)
    options = dict(options)
    stream = options.pop("stream", None)
    if stream:  # every layer streams; with "prefixes", two layers keep their selected rows resident
        from ferry.offload.planner import make_plan
        from helpers import streaming_budget

        prefix = make_plan(dense.model, dtype_bytes=4, budget_bytes=1 << 40, host_available_bytes=1 << 40,
                           ctx=64, sparsity=0.5).prefix_bytes
        extra = 2 * prefix if stream == "prefixes" else 0
        options["gpu_memory"] = streaming_budget(dense.model, resident=0, depth=2, ctx=64) + extra
    sparse = ferry.load(folder, dtype="fp32", ctx=64, progress=False, **options)
    if stream:
        assert len(sparse.plan.streamed_layers) == sparse.model.num_layers
        assert len(sparse.plan.prefix_layers) == (2 if stream == "prefixes" else 0)
    for prompt in PROMPTS:
        want = dense.generate(prompt, max_new_tokens=24, ignore_eos=True)
        got = sparse.generate(prompt, max_new_tokens=24, ignore_eos=True)
        assert got.token_ids == want.token_ids, prompt
        assert got.stats.mode == "sirius" and got.stats.full_passes >= 1
    sparse.close()


def test_sparsity_zero_equals_dense(tiny_model_dir):
    folder = tiny_model_dir("llama3")
    dense = ferry.load(folder, dtype="fp32", ctx=64, progress=False)
    for mode in ("sirius", "sparse"):
        zero = ferry.load(folder, dtype="fp32", ctx=64, progress=False, sparsity=0.0, mode=mode, period=5)
        for prompt in PROMPTS:
            want = dense.generate(prompt, max_new_tokens=16, ignore_eos=True)
            got = zero.generate(prompt, max_new_tokens=16, ignore_eos=True)
            assert got.token_ids == want.token_ids
        assert got.stats.mode == mode


def test_sparse_mode_differs_and_reports_density(tiny_model_dir):
    folder = tiny_model_dir("llama3")
    sparse = ferry.load(folder, dtype="fp32", ctx=64, progress=False, sparsity=0.9, mode="sparse")
    result = sparse.generate("The capital of France", max_new_tokens=12, ignore_eos=True)
    s = result.stats
    assert s.mode == "sparse" and s.full_passes == 0 and s.sparse_steps == 11
    assert s.mlp_density == pytest.approx(0.1, abs=0.01)
    assert s.effective_density == pytest.approx(s.d_sparse) and s.d_sparse < 1


@pytest.mark.parametrize("flags, message", [
    (["--sparsity", "1.5"], "sparsity"), (["--sparsity", "1"], "sparsity"), (["--period", "0"], "period"),
    (["--threshold", "2"], "threshold"), (["--sparse-method", "magic"], "sparse-method"),
])
def test_bad_sparsity_flags_exit_2(flags, message, capsys):
    from ferry.cli import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "-p", "hi", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err

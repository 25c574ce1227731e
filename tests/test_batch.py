"""Batched generation: every sequence of a batch gets what it would get alone, with one weight
read per pass for all of them."""

from __future__ import annotations

import json

import pytest

import ferry
from ferry.engine.batch import BatchRun, generate_batch
from ferry.engine.generation import Request
from helpers import PROMPTS, streaming_budget

COMMON = dict(dtype="fp32", ctx=64, progress=False, reuse_prefix=False)
LENGTHS = [12, 5, 9, 1]  # ragged: sequences finish at different steps


def requests(lengths=LENGTHS) -> list[Request]:
    return [Request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, lengths)]


def batch(rt, reqs: list[Request], size: int | None = None) -> list:
    """The batch's results in input order."""
    results = dict(generate_batch(rt, reqs, size or len(reqs)))
    return [results[i] for i in range(len(reqs))]


def alone(engine, reqs: list[Request]) -> list[list[int]]:
    return [engine.generate(r.prompt, max_new_tokens=r.max_new_tokens, ignore_eos=True).token_ids for r in reqs]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_dense_batch_equals_each_sequence_alone(family, tiny_model_dir):
    engine = ferry.load(tiny_model_dir(family), **COMMON)
    want = alone(engine, requests())
    got = batch(engine.runtime, requests())
    assert [g.token_ids for g in got] == want
    assert [g.stats.new_tokens for g in got] == LENGTHS
    assert all(g.stats.finish_reason == "length" for g in got)


@pytest.mark.parametrize("options", [dict(), dict(sparse_method="cats"), dict(period=3)])
def test_strict_sirius_batch_equals_dense_alone(options, tiny_model_dir):
    folder = tiny_model_dir("llama3")
    dense = ferry.load(folder, **COMMON)
    sirius = ferry.load(folder, **COMMON, sparsity=0.5, accept="strict", **options)
    want = alone(dense, requests())
    got = batch(sirius.runtime, requests())
    assert [g.token_ids for g in got] == want
    assert sum(g.stats.sparse_steps for g in got) > 0 and all(g.stats.mode == "sirius" for g in got)


def test_streamed_batch_reads_each_layer_once_per_pass(tiny_model_dir):
    """Every layer streams: a batch of 4 moves about the bytes of one sequence, not four."""
    folder = tiny_model_dir("llama3")
    from ferry.offload.checkpoint import open_checkpoint

    budget = streaming_budget(open_checkpoint(folder).config, resident=0, depth=2)
    engine = ferry.load(folder, **COMMON, gpu_memory=budget, schedule="serial")
    assert len(engine.plan.streamed_layers) == engine.runtime.model.num_layers
    reqs = requests([8, 8, 8, 8])
    solo = engine.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).stats.h2d_bytes
    got = batch(engine.runtime, reqs)
    assert [g.token_ids for g in got] == alone(engine, reqs)
    batch_bytes = sum(g.stats.h2d_bytes for g in got)
    assert batch_bytes <= solo * 1.05  # 8 passes (one prefill, 7 steps) for all four


def test_a_sequence_joins_a_running_batch_at_a_token_boundary(tiny_model_dir):
    engine = ferry.load(tiny_model_dir("llama3"), **COMMON)
    reqs = requests([10, 6])
    run = BatchRun(engine.runtime)
    run.add(reqs[0])
    for _ in range(4):
        run.step()
    run.add(reqs[1])
    got = run.run()
    assert [g.token_ids for g in got] == alone(engine, reqs)


def test_more_requests_than_the_batch_size_refill_it_as_sequences_finish(tiny_model_dir):
    engine = ferry.load(tiny_model_dir("llama3"), **COMMON)
    reqs = requests([3, 9, 0, 5]) + [Request("word " * 200), Request(PROMPTS[1], max_new_tokens=4, ignore_eos=True)]
    order = [i for i, _ in generate_batch(engine.runtime, reqs, batch_size=2)]
    assert sorted(order) == list(range(6)) and order.index(0) < order.index(1)
    got = batch(engine.runtime, reqs, size=2)
    assert isinstance(got[4], ferry.FerryError) and "more than the context" in str(got[4])
    assert got[2].token_ids == [] and got[2].stats.finish_reason == "length"
    want = alone(engine, [r for i, r in enumerate(reqs) if i != 4])
    assert [g.token_ids for i, g in enumerate(got) if i != 4] == want


def test_bad_request_is_refused_before_anything_runs(tiny_model_dir):
    engine = ferry.load(tiny_model_dir("llama3"), **COMMON)
    run = BatchRun(engine.runtime)
    with pytest.raises(ferry.FerryError, match="more than the context"):
        run.add(Request("word " * 200))
    assert run.seqs == []


def test_prompt_file_in_batches_prints_every_answer_in_input_order(tiny_model_dir, tmp_path, capsys):
    from ferry.cli import main

    file = tmp_path / "prompts.txt"
    file.write_text("\n".join([PROMPTS[0], "word " * 200, *PROMPTS[1:]]) + "\n")
    base = ["generate", "-m", str(tiny_model_dir("llama3")), "--prompt-file", str(file), "-n", "6",
            "--ignore-eos", "--json", "--dtype", "fp32", "--ctx", "64"]
    outputs = {}
    for size in ("1", "3"):
        assert main([*base, "--batch-size", size]) == 2  # the over-long prompt fails, the rest run
        out, err = capsys.readouterr()
        outputs[size] = [json.loads(line) for line in out.splitlines()]
        assert "prompt 2: the prompt has" in err
    assert [r.get("token_ids") for r in outputs["1"]] == [r.get("token_ids") for r in outputs["3"]]
    assert [r["prompt"] for r in outputs["3"]] == [PROMPTS[0], "word " * 200, *PROMPTS[1:]]
    assert "error" in outputs["3"][1] and all("token_ids" in r for i, r in enumerate(outputs["3"]) if i != 1)


FITS = ["--ctx", "2048", "--quant", "int4", "--gpu-memory", "24GiB", "--host-memory", "64GiB", "--device", "cuda"]


def test_plan_counts_the_batch_kv_caches(tmp_path, capsys):
    from pathlib import Path

    from ferry.cli import main

    config = Path(__file__).parent / "data" / "llama-3.1-70b-config.json"
    plans = {}
    for size in ("1", "4"):
        assert main(["plan", "-m", str(config), *FITS, "--batch-size", size, "--json"]) == 0
        plans[size] = json.loads(capsys.readouterr().out)
    assert plans["4"]["kv_cache_bytes"] == 4 * plans["1"]["kv_cache_bytes"]
    assert plans["4"]["batch_size"] == 4
    main(["plan", "-m", str(config), *FITS, "--batch-size", "4"])
    assert "per token of a batch of 4" in capsys.readouterr().out


def test_engine_generate_batch(tiny_model_dir):
    engine = ferry.load(tiny_model_dir("llama3"), **COMMON, batch_size=2)
    got = engine.generate_batch(PROMPTS, max_new_tokens=5, ignore_eos=True)
    assert [g.token_ids for g in got] == alone(engine, requests([5] * 4))
    with pytest.raises(ferry.FerryError, match="more than the context"):
        engine.generate_batch([PROMPTS[0], "word " * 200])

"""Streaming: streamed generation equals resident generation; the planner; the link; pinning."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch

from ferry.cli import main
from ferry.errors import FerryError
from ferry.model.config import ModelConfig
from ferry.model.forward import decode_one, forward, prefill
from ferry.offload import pinned
from ferry.offload.checkpoint import load_hf_config
from ferry.offload.planner import OffloadConfig, make_plan, parse_size
from ferry.offload.sources import resolve_config
from ferry.offload.cpu_links import EmulatedLink, InOrderLink
from helpers import load_tiny, prompt_ids

from pathlib import Path

LLAMA_70B = Path(__file__).parent / "data" / "llama-3.1-70b-config.json"
GiB = 1 << 30


def tiny_layer_bytes(folder) -> int:
    from ferry.model.weights import LayerLayout

    return LayerLayout.for_config(ModelConfig.from_hf(load_hf_config(folder))).numel * 4


def greedy(cfg, weights, rope, cache, prompt, n=12):
    logits = [prefill(cfg, weights, rope, cache, prompt)]
    for _ in range(n - 1):
        token = logits[-1][-1].argmax().view(1)
        logits.append(decode_one(cfg, weights, rope, cache, token))
    return torch.cat(logits)


@pytest.mark.parametrize("family", ["llama3", "qwen2-tied", "mistral"])
@pytest.mark.parametrize("resident_layers, depth, link, pipelined", [
    (0, 1, "inorder", True), (1, 2, "inorder", True), (0, 2, "emulated", True),
    (0, 3, "emulated", False), (1, 1, "emulated", True), (2, 1, "inorder", False),
])
def test_streamed_logits_equal_resident(family, resident_layers, depth, link, pipelined, tiny_model_dir):
    folder = tiny_model_dir(family)
    cfg, weights, rope, cache = load_tiny(folder)
    expected = greedy(cfg, weights, rope, cache, prompt_ids(9))
    chan = InOrderLink() if link == "inorder" else EmulatedLink(50.0)
    cfg, streamed, rope, cache = load_tiny(folder, resident=resident_layers, depth=depth, link=chan,
                                           pipelined=pipelined)
    assert len(streamed.layers.executor.store.order) == cfg.num_layers - resident_layers
    got = greedy(cfg, streamed, rope, cache, prompt_ids(9))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    chan.close()


def test_every_streamed_byte_is_counted(tiny_model_dir):
    folder = tiny_model_dir("llama3")
    layer = tiny_layer_bytes(folder)
    link = InOrderLink()
    cfg, weights, rope, cache = load_tiny(folder, resident=0, depth=2, link=link)
    assert link.stats().bytes == 0  # nothing moves before the first pass
    greedy(cfg, weights, rope, cache, prompt_ids(5), n=4)
    # One fetch per layer per pass, plus the two slots filled ahead for the next pass.
    assert link.stats().bytes == (4 * cfg.num_layers + 2) * layer


def test_pass_cut_short_resynchronises(tiny_model_dir):
    folder = tiny_model_dir("llama3")
    cfg, weights, rope, cache = load_tiny(folder, resident=0, depth=2)
    expected = forward(cfg, weights, rope, cache, prompt_ids(6), 0, all_logits=True)
    weights.layers.acquire(0)  # as if a pass had died inside layer 0
    weights.layers.release(0)
    again = forward(cfg, weights, rope, cache, prompt_ids(6), 0, all_logits=True)
    torch.testing.assert_close(again, expected, atol=0, rtol=0)


def test_emulated_link_copies_in_order_and_counts():
    link = EmulatedLink(gbps=1.0)
    srcs = [torch.full((250_000,), float(i)) for i in range(4)]  # 1 MB each
    dsts = [torch.zeros(250_000) for _ in range(4)]
    tickets = [link.copy(d, s) for d, s in zip(dsts, srcs)]
    link.wait(tickets[-1])
    assert all(t.is_set() for t in tickets)  # the last one done means all earlier ones are
    for i, d in enumerate(dsts):
        assert torch.equal(d, srcs[i])
    stats = link.stats()
    assert stats.bytes == 4 * 1_000_000 and stats.copies == 4
    assert 0 <= stats.overlap <= 1
    link.close()


def test_emulated_link_rejects_bad_bandwidth():
    with pytest.raises(ValueError):
        EmulatedLink(0)


def test_pinning_failure_falls_back_with_one_warning(monkeypatch):
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cannot pin: locked-memory limit")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(pinned.torch, "empty", empty)
    monkeypatch.setattr(pinned, "_pin_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = pinned.host_empty(10, torch.float32, pin=True)
        b = pinned.host_empty(10, torch.float32, pin=True)
    assert a.shape == b.shape == (10,) and not a.is_pinned()
    assert len([w for w in caught if "pinning host memory failed" in str(w.message)]) == 1


def plan_70b(budget=24 * GiB, host=256 * GiB, ctx=4096, depth=2, device="cuda"):
    cfg = ModelConfig.from_hf(resolve_config(str(LLAMA_70B)))
    return cfg, make_plan(cfg, dtype_bytes=2, budget_bytes=budget, host_available_bytes=host,
                          ctx=ctx, prefetch_depth=depth, device=device)


def test_plan_llama3_70b_at_24gib():
    cfg, plan = plan_70b()
    layer = plan.layer_bytes
    assert layer == 2 * (8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 28672 * 8192 + 2 * 8192)
    assert plan.kv_cache_bytes == 2 * 80 * 8 * 4096 * 128 * 2  # sized to ctx, not to 131072
    assert plan.fits and plan.slot_count == 2
    assert len(plan.resident_layers) + len(plan.streamed_layers) == 80
    assert 5 <= len(plan.resident_layers) <= 12
    assert plan.device_bytes <= 24 * GiB
    assert plan.link_bytes["full_pass"] == len(plan.streamed_layers) * layer + 8192 * 2
    assert not plan.embed_on_device  # untied: the embedding rows cost less on the link than a layer


def test_plan_refuses_with_numbers():
    _, small = plan_70b(budget=3 * GiB)
    assert not small.fits and "GiB" in small.problems[0]
    with pytest.raises(FerryError, match="does not fit"):
        small.check()
    _, no_host = plan_70b(host=64 * GiB)
    assert any("host memory" in p for p in no_host.problems)
    _, long_ctx = plan_70b(ctx=131072)
    assert not long_ctx.fits  # a 128K KV cache (40 GiB) cannot fit a 24 GiB card


def test_plan_everything_resident_when_it_fits():
    _, plan = plan_70b(budget=200 * GiB)
    assert plan.streamed_layers == () and plan.slot_count == 0 and plan.link_bytes["full_pass"] == 0


@pytest.mark.parametrize("text, expected", [("20GiB", 20 * GiB), ("512MB", 512_000_000), ("1.5g", 1_500_000_000), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-1GB", "lots", "12XB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(FerryError):
        parse_size(text)


def test_offload_config_validation():
    with pytest.raises(FerryError):
        OffloadConfig(prefetch_depth=0)
    with pytest.raises(FerryError):
        OffloadConfig(schedule="eager")


def test_plan_cli_70b_json(capsys):
    t0 = time.perf_counter()
    code = main(["plan", "-m", str(LLAMA_70B), "--device", "cuda", "--gpu-memory", "24GiB",
                 "--host-memory", "192GiB", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"]
    assert out["bytes_per_token"]["dense"] > 100 * GiB
    assert out["resident_bytes"] <= 24 * GiB
    assert time.perf_counter() - t0 < 30  # from the config alone: no weights exist to read


@pytest.mark.parametrize("flags, message", [
    (["--gpu-memory", "0"], "gpu-memory"), (["--gpu-memory", "lots"], "gpu-memory"),
    (["--prefetch-depth", "0"], "prefetch-depth"), (["--emulate-link", "0"], "emulate-link"),
])
def test_bad_offload_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "-p", "hi", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_budget_below_one_layer_exits_2(tiny_model_dir, capsys):
    code = main(["generate", "-m", str(tiny_model_dir()), "-p", "hi", "--gpu-memory", "20KB"])
    assert code == 2 and "does not fit" in capsys.readouterr().err


def test_generate_streamed_reports_bytes(tiny_model_dir, capsys):
    folder = tiny_model_dir()
    args = ["generate", "-m", str(folder), "-p", "The capital", "-n", "6", "--json", "--ignore-eos"]
    assert main(args) == 0
    resident = json.loads(capsys.readouterr().out)
    assert main(args + ["--gpu-memory", "17MB", "--emulate-link", "20", "--prefetch-depth", "1"]) == 0
    out, err = capsys.readouterr()
    streamed = json.loads(out)
    assert "layers stream from host memory" in err
    assert streamed["token_ids"] == resident["token_ids"]
    assert resident["stats"]["h2d_bytes"] == 0
    assert streamed["stats"]["h2d_bytes"] > 0 and streamed["stats"]["h2d_gbps"] > 0
    assert 0 <= streamed["stats"]["overlap"] <= 1

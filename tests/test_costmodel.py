"""The cost model against published offloading figures (within 10%)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.model.config import ModelConfig
from ferry.model.weights import LayerLayout
from ferry.offload.costmodel import GPUS, Costs, predict
from ferry.offload.sources import resolve_config
from ferry.sparse.griffin import kept_neurons

LLAMA_70B = Path(__file__).parent / "data" / "llama-3.1-70b-config.json"


def published_costs(sparsity: float = 0.5, bytes_per_param: int = 2) -> Costs:
    """Nothing but embeddings, lm_head and the slots resident: every layer streams."""
    cfg = ModelConfig.from_hf(resolve_config(str(LLAMA_70B)))
    layout = LayerLayout.for_config(cfg)
    layer = layout.numel * bytes_per_param
    prefix = layout.prefix_numel(kept_neurons(cfg.intermediate_size, sparsity)) * bytes_per_param
    head = cfg.vocab_size * cfg.hidden_size * bytes_per_param
    return Costs(cfg.num_layers, layer, prefix, head, cfg.num_layers * layer, cfg.num_layers * prefix)


def test_sirius_paper_setup_dense_and_sparse():
    """Llama-3-70B-Instruct, bf16, PCIe 25 GB/s: dense 5.72 s/token, sparse (50%) 3.57 s/token."""
    p = predict(published_costs(), link_gbps=25.0, mem_gbps=GPUS["rtx4090"].memory_gbps, period=16, aal=15.0)
    assert p["dense"] == pytest.approx(5.72, rel=0.10)
    assert p["sparse"] == pytest.approx(3.57, rel=0.10)


def test_sequoia_offloading_baseline():
    """Llama-2-70B fp16 on an RTX 4090 at 31.5 GB/s: 4.54 s/token (same layer shapes as Llama-3-70B
    but a 32000-token vocabulary, which only changes the resident head)."""
    p = predict(published_costs(), link_gbps=31.5, mem_gbps=GPUS["rtx4090"].memory_gbps, period=16, aal=15.0)
    assert p["dense"] == pytest.approx(4.54, rel=0.10)


def test_pipelined_is_never_slower_than_serial():
    c = published_costs()
    p = predict(c, link_gbps=25.0, mem_gbps=1008, period=16, aal=10.0)
    assert p["ferry"] <= p["sirius_published"] and p["ferry_dense"] <= p["dense"]

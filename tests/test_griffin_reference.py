"""Griffin decoding against an independent reference: transformers with each layer's MLP masked
to the prompt's top neurons (fp32 tiny models). A reorder that moved the wrong rows, or a device
prefix out of step with its host buffer, changes these tokens; strict Sirius would hide it."""

from __future__ import annotations

import pytest
import torch

import ferry
from conftest import tiny_hf_model
from ferry.offload.accounting import kept_neurons
from ferry.offload.planner import make_plan
from ferry.sparse.griffin import griffin_scores
from helpers import streaming_budget

PROMPTS = ["The capital of France is Paris. Count to ten: one two", "def add(a, b): return a + b and a quick"]
N = 8


def masked_greedy(hf, ids: list[int], sparsity: float, n: int) -> list[int]:
    """Greedy tokens: the first from the full prompt, the rest with every MLP keeping only the k
    neurons of best Griffin score over the prompt's activations."""
    layers = hf.model.layers
    seen, masks = {}, {}

    def capture(i):
        def hook(module, args):
            if i in masks:
                return (args[0] * masks[i].to(args[0].device),)
            seen[i] = args[0][0]  # the prompt's z [T, I]
        return hook
    handles = [layer.mlp.down_proj.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            device = next(hf.parameters()).device
            out = hf(torch.tensor([ids], device=device), use_cache=True)
            width = seen[0].shape[-1]
            for i, z in seen.items():
                masks[i] = torch.zeros(width)
                masks[i][torch.topk(griffin_scores(z.cpu()), kept_neurons(width, sparsity)).indices] = 1.0
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(n - 1):
                out = hf(torch.tensor([[tokens[-1]]], device=device), cache=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
    finally:
        for handle in handles:
            handle.remove()
    return tokens


@pytest.mark.parametrize("stream, device", [
    ("resident", "cpu"), ("prefixes", "cpu"),
    pytest.param("resident", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_sparse_decode_equals_masked_transformers(stream, device, tiny_model_dir):
    family, sparsity = "llama3", 0.5
    folder = tiny_model_dir(family)
    options = dict(dtype="fp32", device=device, ctx=64, progress=False, sparsity=sparsity, mode="sparse",
                   reuse_prefix=False)
    if stream == "prefixes":  # every layer streams; two keep their selected rows on the device
        model = ferry.load(folder, dtype="fp32", ctx=64, progress=False).model
        prefix = make_plan(model, dtype_bytes=4, budget_bytes=1 << 40, host_available_bytes=1 << 40,
                           ctx=64, sparsity=sparsity).prefix_bytes
        options["gpu_memory"] = streaming_budget(model, resident=0, depth=2, ctx=64) + 2 * prefix
        options["emulate_link_gbps"] = 50.0  # copies on the link's own thread, as a GPU's are on its stream
    engine = ferry.load(folder, **options)
    assert len(engine.plan.prefix_layers) == (2 if stream == "prefixes" else 0)
    hf = tiny_hf_model(family).to(device)
    dense = masked_greedy(hf, engine.encode(PROMPTS[0], chat=False), 0.0, N)
    assert dense != masked_greedy(hf, engine.encode(PROMPTS[0], chat=False), sparsity, N)  # the mask matters
    for prompt in PROMPTS + PROMPTS[:1]:  # later prompts reorder neurons another prompt ordered
        ours = engine.generate(prompt, max_new_tokens=N, chat=False, ignore_eos=True)
        assert ours.stats.sparse_steps == N - 1 and ours.stats.full_passes == 0
        assert ours.token_ids == masked_greedy(hf, engine.encode(prompt, chat=False), sparsity, N)

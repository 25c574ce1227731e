"""Helpers shared by the test modules: tiny-model loading and budgets, a mock model for the
correction loop, and tiny GGUF files (tests import these, never each other)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ferry.model.kv_cache import KVCache
from ferry.model.rope import rope_for
from ferry.offload.checkpoint import open_checkpoint
from ferry.offload.cpu_links import InOrderLink
from ferry.offload.loader import load_model
from ferry.offload.planner import make_plan

V, EOS = 20, 19  # the mock model's vocabulary and stop token
PROMPTS = ["The capital of France", "def add(a, b):", "A quick brown fox", "Count to ten: one two"]


def streaming_budget(cfg, resident: int, depth: int, ctx: int = 64) -> int:
    """The device budget that leaves `resident` layers resident plus `depth` streaming slots."""
    p = make_plan(cfg, dtype_bytes=4, budget_bytes=1 << 40, host_available_bytes=1 << 40, ctx=ctx)
    fixed = p.kv_cache_bytes + p.workspace_bytes + p.norm_bytes + (p.lm_head_bytes or p.embed_bytes)
    return fixed + (resident + depth) * p.layer_bytes


def load_tiny(folder, capacity: int = 64, budget: int = 1 << 40, depth: int = 2, link=None,
              pipelined: bool = True, resident: int | None = None):
    """A tiny checkpoint in fp32 on the CPU; `resident` (or a small budget) makes layers stream."""
    ckpt = open_checkpoint(folder)
    cfg = ckpt.config
    if resident is not None:
        budget = streaming_budget(cfg, resident, depth, capacity)
    plan = make_plan(cfg, dtype_bytes=4, budget_bytes=budget, host_available_bytes=1 << 40,
                     ctx=capacity, prefetch_depth=depth).check()
    weights, _ = load_model(ckpt, plan, torch.float32, torch.device("cpu"), link or InOrderLink(),
                            pipelined=pipelined, progress=False)
    rope = rope_for(cfg, capacity, torch.float32, "cpu")
    return cfg, weights, rope, KVCache(cfg, capacity, torch.float32, torch.device("cpu"))


def prompt_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed))


# --- a mock model for the accept/rollback logic ---------------------------------------------------

class MockCache:
    def __init__(self, capacity: int, length: int):
        self.capacity, self.length = capacity, length

    def rollback(self, length: int) -> None:
        assert 0 <= length <= self.length
        self.length = length


class MockPasses:
    """Full model: at position p it predicts full[p]; sparse model predicts sparse[p]."""

    def __init__(self, full: dict[int, int], sparse: dict[int, int], capacity=100, prompt=5):
        self.full_pred, self.sparse_pred = full, sparse
        self.cache = MockCache(capacity, prompt)
        self.step_input = torch.empty(1, dtype=torch.long)
        self.checked: list[int] = []  # every token the full model has seen, by position
        self.checked_at: dict[int, int] = {}

    def expect(self, kinds) -> None:
        pass

    def sparse_step(self, token: int) -> torch.Tensor:
        pos = self.cache.length
        self.cache.length += 1
        return torch.nn.functional.one_hot(torch.tensor(self.sparse_pred.get(pos, 0)), V).float() * 10

    LAYERS = 4

    def full(self, tokens: torch.Tensor, start: int, between=None) -> torch.Tensor:
        assert start <= self.cache.length
        for i, t in enumerate(tokens.tolist()):
            self.checked_at[start + i] = t
        for layer in range(self.LAYERS):  # speculative steps write after the pass's positions
            if between is not None:
                between(layer)
        self.cache.length = start + len(tokens)
        rows = [self.full_pred.get(start + i, 0) for i in range(len(tokens))]
        return torch.nn.functional.one_hot(torch.tensor(rows), V).float() * 10


def truth(n=200, start=5):
    return {p: 1 + (p * 7) % 17 for p in range(start, start + n)}  # never EOS


# --- GGUF files ---------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes for q/k (each head's rotary halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(cfg: dict) -> np.ndarray:
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py writes it for llama3 rope scaling."""
    p = cfg["rope_parameters"]
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * p["rope_theta"] ** (i / dim)
        old = p["original_max_position_embeddings"]
        if wavelen < old / p["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > old / p["low_freq_factor"]:
            factors.append(p["factor"])
        else:
            smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def write_gguf(folder: Path, out: Path, extra: dict[str, np.ndarray] | None = None,
               qtypes: dict | None = None) -> Path:
    """A tiny llama GGUF (gpt2 tokenizer) of the checkpoint in `folder`: f32 tensors, but those
    named in `qtypes` (GGUF name -> GGMLQuantizationType) quantized by the gguf package."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens = vocab + [f"<unused{i}>" for i in range(cfg["vocab_size"] - len(vocab))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_pad_token_id(0)
    heads = {"self_attn.q_proj": cfg["num_attention_heads"], "self_attn.k_proj": cfg["num_key_value_heads"]}
    for name, t in load_file(folder / "model.safetensors").items():
        a, parts = t.float().numpy(), name.split(".")
        if parts[1] == "layers":
            module = ".".join(parts[3:-1])
            if module in heads:
                a = llama_cpp_permute(a, heads[module])
            name = f"blk.{parts[2]}.{_GGUF_LAYER[module]}.{parts[-1]}"
        else:
            name = f"{_GGUF_TOP[name.rsplit('.', 1)[0]]}.{parts[-1]}"
        qtype = (qtypes or {}).get(name)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(a))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a), qtype), raw_dtype=qtype)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def default_sigint() -> None:
    """preexec_fn for a child that is sent SIGINT: a test run started in the background (SIGINT
    ignored, which children inherit) must not make Python skip its KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)

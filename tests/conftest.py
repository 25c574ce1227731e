"""Tiny random checkpoints built from transformers configs: nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter (read when Triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 384
FAMILIES = {
    # name: (config class name, extra config fields)
    "llama3": ("LlamaConfig", dict(
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
    )),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    # MLPs of whole 64-row blocks: the packed int4 kernel path (`ferry.model.packed`) takes these
    "llama3-blocks": ("LlamaConfig", dict(tie_word_embeddings=False, intermediate_size=192)),
    "qwen2-blocks": ("Qwen2Config", dict(tie_word_embeddings=False, intermediate_size=192)),
}


def tiny_config(family: str):
    import transformers

    cls_name, extra = FAMILIES[family]
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return getattr(transformers, cls_name)(**(fields | extra))


def tiny_hf_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Random init leaves biases at zero; give them values so the bias path is really tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The capital of France is Paris.", "Count to ten: one two three four five six.",
            "def add(a, b): return a + b", "A quick brown fox jumps over the lazy dog."] * 20
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny(folder: Path, family: str, tokenizer, seed: int = 0, max_shard_size: str | None = None) -> Path:
    model = tiny_hf_model(family, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: folder of a saved tiny checkpoint for a family (cached per session)."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama3", max_shard_size: str | None = None) -> Path:
        key = (family, max_shard_size)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = save_tiny(folder, family, tiny_tokenizer, max_shard_size=max_shard_size)
        return made[key]

    return make


@pytest.fixture(autouse=True)
def steady_threads(monkeypatch):
    """Generations fit torch's thread count to the cores other processes leave free (threads
    auto); tests compare generations exactly, so here the count does not follow the machine's
    load (a changed count may change float summation order)."""
    from ferry.kernels import threads

    monkeypatch.setattr(threads, "busy_elsewhere", lambda samples=5: 0)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """ferry's cache folder ($FERRY_CACHE_DIR) in the test's own temporary folder."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FERRY_CACHE_DIR", str(root))
    return root

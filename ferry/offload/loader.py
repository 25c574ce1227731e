"""Load a checkpoint's tensors into the compute layout of `ModelWeights`, all on one device."""

from __future__ import annotations

import torch
from tqdm import tqdm

from ferry.model.config import ModelConfig
from ferry.model.weights import LayerWeights, ModelWeights
from ferry.offload.checkpoint import Checkpoint, TensorReader


def load_weights(
    checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, progress: bool = True
) -> ModelWeights:
    cfg = checkpoint.config
    reader = TensorReader(checkpoint)

    def get(name: str) -> torch.Tensor:
        return reader.get(name).to(device=device, dtype=dtype)

    layers = tuple(
        _load_layer(cfg, get, f"model.layers.{i}.")
        for i in tqdm(range(cfg.num_layers), desc="loading layers", unit="layer", disable=not progress)
    )
    embed = get("model.embed_tokens.weight")
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in reader
    return ModelWeights(
        embed=embed,
        layers=layers,
        norm=get("model.norm.weight"),
        lm_head=embed if tied else get("lm_head.weight"),
    )


def _load_layer(cfg: ModelConfig, get, prefix: str) -> LayerWeights:
    attn = prefix + "self_attn."
    bias = None
    if cfg.attention_bias:
        bias = torch.cat([get(f"{attn}{p}_proj.bias") for p in "qkv"])
    return LayerWeights(
        attn_norm=get(prefix + "input_layernorm.weight"),
        qkv=torch.cat([get(f"{attn}{p}_proj.weight") for p in "qkv"]),
        qkv_bias=bias,
        o=get(attn + "o_proj.weight"),
        mlp_norm=get(prefix + "post_attention_layernorm.weight"),
        gate_up=torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")]),
        down=get(prefix + "mlp.down_proj.weight"),
    )

"""Checkpoint tensors -> one layer's flat buffer, in ferry's layout.

The one place that knows the Hugging Face tensor names of a decoder layer; the bf16 loader and
the quantizer both pack through it.
"""

from __future__ import annotations

import torch

from ferry.model.config import ModelConfig
from ferry.model.weights import LayerLayout, LayerWeights


def pack_layer(cfg: ModelConfig, layout: LayerLayout, get, prefix: str, flat: torch.Tensor) -> None:
    """Copy one checkpoint layer into its flat buffer (casting to the buffer's dtype)."""
    w: LayerWeights = layout.views(flat)
    bundle = w.mlp[0]
    attn, q, kv = prefix + "self_attn.", cfg.q_size, cfg.kv_size
    w.attn_norm.copy_(get(prefix + "input_layernorm.weight"))
    for rows, name in ((slice(0, q), "q"), (slice(q, q + kv), "k"), (slice(q + kv, q + 2 * kv), "v")):
        w.qkv[rows].copy_(get(f"{attn}{name}_proj.weight"))
        if w.qkv_bias is not None:
            w.qkv_bias[rows].copy_(get(f"{attn}{name}_proj.bias"))
    w.o.copy_(get(attn + "o_proj.weight"))
    w.mlp_norm.copy_(get(prefix + "post_attention_layernorm.weight"))
    bundle[:, 0].copy_(get(prefix + "mlp.gate_proj.weight"))
    bundle[:, 1].copy_(get(prefix + "mlp.up_proj.weight"))
    bundle[:, 2].copy_(get(prefix + "mlp.down_proj.weight").t())  # down columns become rows

"""Checkpoint tensors -> one layer's flat buffer, in ferry's layout.

The one place that knows the Hugging Face tensor names of a decoder layer; the bf16 loader and
the quantizer both pack through it. Each tensor is asked for with the shape the config implies,
so the reader checks shape, dtype and finiteness before the copy: `copy_` would broadcast a
[1, H] q_proj or a [1] norm into the buffer and the model would answer garbage with exit 0.
"""

from __future__ import annotations

from typing import Callable

import torch

from ferry.kernels.quant import Grouped
from ferry.kernels.quant_fit import fit_groups
from ferry.model.config import ModelConfig
from ferry.model.quant import QuantLayout, write_down, write_matrix, write_records
from ferry.model.weights import LayerLayout, LayerWeights

# get(name, shape) -> the tensor, checked against shape (TensorReader.get)
Getter = Callable[[str, tuple[int, ...]], torch.Tensor]


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint shape of each tensor of a decoder layer (names after the layer prefix)."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
              "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
    if cfg.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                       "self_attn.v_proj.bias": (kv,)})
    return shapes


def pack_layer(cfg: ModelConfig, layout: LayerLayout, get: Getter, prefix: str, flat: torch.Tensor) -> None:
    """Copy one checkpoint layer into its flat buffer (casting to the buffer's dtype)."""
    shapes = layer_shapes(cfg)

    def read(name: str) -> torch.Tensor:
        return get(prefix + name, shapes[name])

    w: LayerWeights = layout.views(flat)
    bundle = w.mlp[0]
    q, kv = cfg.q_size, cfg.kv_size
    w.attn_norm.copy_(read("input_layernorm.weight"))
    for rows, name in ((slice(0, q), "q"), (slice(q, q + kv), "k"), (slice(q + kv, q + 2 * kv), "v")):
        w.qkv[rows].copy_(read(f"self_attn.{name}_proj.weight"))
        if w.qkv_bias is not None:
            w.qkv_bias[rows].copy_(read(f"self_attn.{name}_proj.bias"))
    w.o.copy_(read("self_attn.o_proj.weight"))
    w.mlp_norm.copy_(read("post_attention_layernorm.weight"))
    bundle[:, 0].copy_(read("mlp.gate_proj.weight"))
    bundle[:, 1].copy_(read("mlp.up_proj.weight"))
    bundle[:, 2].copy_(read("mlp.down_proj.weight").t())  # down columns become rows


def pack_quant_layer(cfg: ModelConfig, q: QuantLayout, reader, prefix: str, out: torch.Tensor,
                     fit: bool = True) -> set[str]:
    """One checkpoint layer into its quantized buffer `out` (uint8, `q`'s layout).

    Weights stored in groups that match the layout (`reader.grouped`) are copied as they are,
    down_proj included (its groups run along its input dimension in the layout too); float
    weights, and grouped ones of another format, are quantized by `fit_groups`. Returns the
    names of the weights whose source groups were not kept."""
    shapes = layer_shapes(cfg)
    redone: set[str] = set()

    def grouped(name: str) -> Grouped:
        full = prefix + name
        g = reader.grouped(full) if hasattr(reader, "grouped") else None
        if g is not None and g.bits == q.bits and g.group == q.group:
            return g
        if g is not None:
            redone.add(name)
        return fit_groups(reader.get(full, shapes[name]), q.bits, q.group, fit)

    for sec in q.sections:
        if len(sec.shape) == 1:
            _write_vector(q, out, sec, reader, prefix, shapes)
    q_rows, kv = cfg.q_size, cfg.kv_size
    for rows, name in ((slice(0, q_rows), "q"), (slice(q_rows, q_rows + kv), "k"),
                       (slice(q_rows + kv, q_rows + 2 * kv), "v")):
        write_matrix(q, out, "qkv", grouped(f"self_attn.{name}_proj.weight"), rows)
    write_matrix(q, out, "o", grouped("self_attn.o_proj.weight"))
    write_records(q, out, 0, grouped("mlp.gate_proj.weight"), grouped("mlp.up_proj.weight"))
    write_down(q, out, grouped("mlp.down_proj.weight"))
    return redone


_VECTORS = {"attn_norm": ["input_layernorm.weight"], "mlp_norm": ["post_attention_layernorm.weight"],
            "qkv_bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]}


def _write_vector(q: QuantLayout, out: torch.Tensor, sec, reader, prefix: str, shapes: dict) -> None:
    """A norm or the stacked q/k/v bias, stored as fp32 values."""
    dst = out[sec.offset:sec.offset + sec.size].view(torch.float32)
    parts = [reader.get(prefix + name, shapes[name]) for name in _VECTORS[sec.name]]
    dst.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])

"""Load a checkpoint following a Plan: resident tensors onto the device, the rest into the host store.

Each layer is read (lazily, through safetensors) and packed straight into its final flat buffer,
one layer at a time with the file mappings dropped in between, so peak memory stays near the
size of the host store instead of holding a second full copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from tqdm import tqdm

from ferry.errors import FerryError
from ferry.kernels.quant_fit import fit_groups
from ferry.model.packed import int8_head
from ferry.model.quant import QuantConfig, QuantLayout, head_group
from ferry.model.weights import Kind, LayerLayout, ModelWeights
from ferry.offload.checkpoint import Checkpoint, TensorReader
from ferry.offload.pack import pack_layer
from ferry.offload.planner import Plan
from ferry.offload.quant_store import load_quantized_layers
from ferry.offload.executor import LayerExecutor, PassView
from ferry.offload.pinned import host_empty
from ferry.offload.transfer import Link
from ferry.kernels.quant import pick_backend


@dataclass(frozen=True)
class LoadReport:
    host_store_bytes: int
    pinned: bool
    peak_rss_bytes: int  # highest resident set size sampled while loading
    rss_before_bytes: int


def _load_layers(checkpoint, layout, reader, streamed, dtype, device, pin, progress):
    """(resident layers, streamed layers' host buffers, peak RSS), packed one layer at a time."""
    process = psutil.Process()
    peak = process.memory_info().rss
    resident: dict[int, torch.Tensor] = {}
    host: dict[int, torch.Tensor] = {}
    for i in tqdm(range(checkpoint.config.num_layers), desc="loading layers", unit="layer", disable=not progress):
        if i in streamed:
            flat = host[i] = host_empty(layout.numel, dtype, pin)
        else:
            flat = torch.empty(layout.numel, dtype=dtype, device=device)
        pack_layer(checkpoint.config, layout, reader.get, f"model.layers.{i}.", flat)
        if i not in streamed:
            resident[i] = flat
        peak = max(peak, process.memory_info().rss)
        reader.close()  # drop the file mappings so their pages leave our resident set
    return resident, host, peak


DEQUANT_ROWS = 4096  # rows of a grouped matrix dequantized at a time


def read_matrix(reader: TensorReader, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint matrix in `dtype`. One stored in groups is dequantized a block of rows at a
    time, so no fp32 copy of a whole embedding table is ever made."""
    grouped = reader.grouped(name, shape)
    if grouped is None:
        return reader.get(name, shape).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    for lo in range(0, shape[0], DEQUANT_ROWS):
        rows = slice(lo, lo + DEQUANT_ROWS)
        out[rows] = grouped.rows(rows).dequantize(dtype)
    return out


def head_blocks(reader: TensorReader, name: str, shape: tuple[int, int], group: int):
    """(first row, int8 Grouped) blocks of lm_head: a checkpoint's int8 groups of this size as
    stored (GGUF Q8_0), anything else quantized from its values (plain ranges: int8's rounding
    is a 254th of a group's range, and the head is quantized at every load, not cached)."""
    grouped = reader.grouped(name, shape)
    keep = grouped is not None and grouped.bits == 8 and grouped.group == group
    values = None if grouped is not None else reader.get(name, shape)
    for lo in range(0, shape[0], DEQUANT_ROWS):
        rows = slice(lo, lo + DEQUANT_ROWS)
        if keep:
            yield lo, grouped.rows(rows)
        else:
            block = grouped.rows(rows).dequantize(torch.float32) if grouped is not None else values[rows].float()
            try:
                yield lo, fit_groups(block, 8, group, fit=False)
            except ValueError as err:  # a NaN or an infinity
                raise FerryError(f"{name}: {err}") from None


def load_model(
    checkpoint: Checkpoint, plan: Plan, dtype: torch.dtype, device: torch.device, link: Link,
    pipelined: bool = True, progress: bool = True, quant: QuantConfig = QuantConfig("none"),
) -> tuple[ModelWeights, LoadReport]:
    """quant: the decoder layers' weights are quantized (once, cached on disk) and stay quantized
    in host and device memory; lm_head is int8 groups when quant.head_quantized; embeddings and
    the final norm keep the compute dtype."""
    cfg = checkpoint.config
    layout = LayerLayout.for_config(cfg)
    reader = TensorReader(checkpoint)
    pin = device.type == "cuda"
    rss_before = psutil.Process().memory_info().rss
    streamed = set(plan.streamed_layers)
    qlayout = QuantLayout.for_config(cfg, quant) if quant.enabled else None
    if qlayout is not None:
        resident, host, peak = load_quantized_layers(checkpoint, qlayout, streamed, device, pin, progress,
                                                     quant.fit)
    else:
        resident, host, peak = _load_layers(checkpoint, layout, reader, streamed, dtype, device, pin, progress)
    embed_device = device if plan.embed_on_device else torch.device("cpu")
    table = (cfg.vocab_size, cfg.hidden_size)  # an embedding short of vocab_size rows is refused here
    embed = read_matrix(reader, "model.embed_tokens.weight", table, dtype).to(embed_device)
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in reader
    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    group = head_group(cfg, quant) if quant.head_quantized else 0
    if group:
        lm_head = int8_head(table, group, head_blocks(reader, head_name, table, group), device, dtype)
    else:
        lm_head = embed.to(device) if tied else read_matrix(reader, "lm_head.weight", table, dtype).to(device)
    norm = reader.get("model.norm.weight", (cfg.hidden_size,)).to(device=device, dtype=dtype)
    reader.close()
    executor = LayerExecutor(layout, resident, host, plan.prefetch_depth, link, device, dtype,
                             pipelined, prefix_layers=plan.prefix_layers, quant=qlayout,
                             dequant_backend=pick_backend(device, dtype))  # packs resident layers
    peak = max(peak, psutil.Process().memory_info().rss)
    store_bytes = sum(t.numel() * t.element_size() for t in host.values())
    if not plan.embed_on_device:
        store_bytes += embed.numel() * embed.element_size()
    pinned = pin and all(t.is_pinned() for t in host.values())
    report = LoadReport(store_bytes, pinned, peak, rss_before)
    weights = ModelWeights(embed=embed, layers=PassView(executor, Kind.FULL), norm=norm, lm_head=lm_head)
    return weights, report

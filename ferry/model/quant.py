"""Quantized layers as data: one flat uint8 buffer per layer, its neurons still a byte prefix.

The host store, streaming slots, resident layers and resident prefixes of a quantized model
hold bytes laid out by `QuantLayout`; before a layer computes, the device dequantizes what the
pass uses into one compute-dtype buffer laid out exactly like an unquantized layer
(`LayerLayout`), so the model math and `LayerLayout.views` are unchanged.

Byte layout of a layer (every section starts on a 16-byte boundary):

- attention, in `LayerLayout.shapes` order: vectors (norms, q/k/v bias) as fp32 values;
  matrices (qkv [q + 2 kv, H], o [H, q]) as all rows' codes [R, C * bits / 8] then all rows'
  fp16 scales [R, C / group] (see `ferry.kernels.quant` for the row format);
- the MLP: one fixed-size record per neuron, in neuron order: the codes of its gate row, up row
  and down column [3, H * bits / 8], then their scales [3, H / group].

Neurons 0..k-1 are therefore a byte prefix of the layer: a sparse step's fetch is one
contiguous copy, resident prefixes work as before, and Griffin's reorder is a row gather of
whole records. The layout exposes the interface the executor and the planner use for
unquantized layers (`numel`, `prefix_numel`, `mlp_offset`, `row_numel`), counted in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ferry.errors import SettingError
from ferry.kernels.quant import dequantize, quantize_rows
from ferry.model.config import ModelConfig
from ferry.model.weights import LayerLayout

QUANTS = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
MIN_GROUP, GROUP_STEP = 32, 8  # groups are multiples of 8 values so every section stays aligned
ALIGN = 16


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the decoder layers' linear weights (the host copy)."""

    method: str = "none"  # none, int8 or int4
    group_size: int = 128  # the largest group; a row's group is the largest that divides it

    def __post_init__(self) -> None:
        if self.method not in QUANTS:
            raise SettingError("quant", f"must be one of {', '.join(QUANTS)}, got {self.method!r}")
        if (not isinstance(self.group_size, int) or self.group_size < MIN_GROUP
                or self.group_size > 1024 or self.group_size % GROUP_STEP):
            raise SettingError("quant_group", f"must be a multiple of {GROUP_STEP} in [{MIN_GROUP}, 1024], "
                               f"got {self.group_size}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def bits(self) -> int:
        return BITS[self.method]


def group_for(cfg: ModelConfig, quant: QuantConfig) -> int:
    """The group size for this model: the largest multiple of 8, at most quant.group_size and at
    least 32, dividing every stored row (qkv, gate, up rows and down columns have H values, o rows
    have q). SmolLM2's hidden size 576 = 4.5 x 128 gets groups of 96."""
    rows = {cfg.hidden_size, cfg.q_size}
    for g in range(quant.group_size, MIN_GROUP - 1, -GROUP_STEP):
        if all(n % g == 0 for n in rows):
            return g
    raise SettingError(
        "quant", f"{quant.method}: no group size between {MIN_GROUP} and {quant.group_size} "
        f"(a multiple of {GROUP_STEP}) divides the rows of this model (lengths {sorted(rows)}); "
        f"run it unquantized")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Section:
    name: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the layer
    size: int  # bytes


@dataclass(frozen=True)
class QuantLayout:
    base: LayerLayout
    bits: int
    group: int
    sections: tuple[Section, ...]  # the attention part, in base.shapes order
    mlp_offset: int  # bytes before the first neuron record

    @classmethod
    def for_config(cls, cfg: ModelConfig, quant: QuantConfig) -> "QuantLayout":
        base, bits, group = LayerLayout.for_config(cfg), quant.bits, group_for(cfg, quant)
        sections, offset = [], 0
        for name, shape in base.shapes:
            size = 4 * shape[0] if len(shape) == 1 else shape[0] * _row_bytes(shape[1], bits, group)
            sections.append(Section(name, shape, offset, size))
            offset = _aligned(offset + size)
        return cls(base, bits, group, tuple(sections), offset)

    @property
    def intermediate_size(self) -> int:
        return self.base.intermediate_size

    @property
    def hidden_size(self) -> int:
        return self.base.hidden_size

    @property
    def row_numel(self) -> int:
        """Bytes of one neuron record (gate, up, down column with their scales)."""
        return 3 * _row_bytes(self.hidden_size, self.bits, self.group)

    def prefix_numel(self, rows: int) -> int:
        """Bytes of the attention part plus the first `rows` neuron records."""
        return self.mlp_offset + rows * self.row_numel

    @property
    def numel(self) -> int:
        return self.prefix_numel(self.intermediate_size)

    def matrix(self, flat: torch.Tensor, sec: Section) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [R, Cb], scales fp16 [R, G]) of a quantized matrix section."""
        r, c = sec.shape
        cb = c * self.bits // 8
        raw = flat[sec.offset:sec.offset + sec.size]
        return raw[:r * cb].view(r, cb), raw[r * cb:].view(torch.float16).view(r, c // self.group)

    def records(self, raw: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [n, 3, Hb], scales fp16 [n, 3, H / group]) of n records starting at raw[0]."""
        h = self.hidden_size
        hb = h * self.bits // 8
        rec = raw[:n * self.row_numel].view(n, self.row_numel)
        return rec[:, :3 * hb].view(n, 3, hb), rec[:, 3 * hb:].view(torch.float16).view(n, 3, h // self.group)

    def mlp_records(self, flat: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Records lo..hi-1 of a buffer laid out like a whole layer."""
        return self.records(flat[self.mlp_offset + lo * self.row_numel:], hi - lo)


def _row_bytes(c: int, bits: int, group: int) -> int:
    return c * bits // 8 + 2 * (c // group)


QUANT_CHUNK_ROWS = 1024  # rows quantized at a time (bounds the fp32 temporaries)


def quantize_layer(q: QuantLayout, full: torch.Tensor, out: torch.Tensor) -> None:
    """Quantize a layer packed in the unquantized layout (`full`, any float dtype) into `out` (uint8)."""
    views = q.base.attention_views(full)
    for sec in q.sections:
        src = views[sec.name]
        if len(sec.shape) == 1:
            out[sec.offset:sec.offset + sec.size].view(torch.float32).copy_(src)
            continue
        codes, scales = q.matrix(out, sec)
        for lo in range(0, sec.shape[0], QUANT_CHUNK_ROWS):
            c, s = quantize_rows(src[lo:lo + QUANT_CHUNK_ROWS], q.bits, q.group)
            codes[lo:lo + len(c)].copy_(c)
            scales[lo:lo + len(s)].copy_(s)
    n, h = q.intermediate_size, q.hidden_size
    for lo in range(0, n, QUANT_CHUNK_ROWS):
        hi = min(n, lo + QUANT_CHUNK_ROWS)
        c, s = quantize_rows(q.base.bundle(full, lo, hi).reshape(-1, h), q.bits, q.group)
        codes, scales = q.mlp_records(out, lo, hi)
        codes.copy_(c.view(hi - lo, 3, -1))
        scales.copy_(s.view(hi - lo, 3, -1))


def dequantize_jobs(q: QuantLayout, src: torch.Tensor, out: torch.Tensor, rows: int, backend: str) -> list:
    """The steps that bring the attention part and neurons 0..rows-1 of `src` (uint8, layer
    layout, possibly only that prefix) into `out` (compute dtype, unquantized layout): what a pass
    over `rows` neurons uses. Built once per buffer and pass kind, so running them creates no
    tensors (the decode loop allocates nothing)."""
    views = q.base.attention_views(out)
    jobs = []
    for sec in q.sections:
        if len(sec.shape) == 1:
            jobs.append(partial(torch.Tensor.copy_, views[sec.name],
                                src[sec.offset:sec.offset + sec.size].view(torch.float32)))
        else:
            jobs.append(partial(dequantize, *q.matrix(src, sec), q.bits, views[sec.name], backend))
    if rows:
        jobs.append(partial(dequantize, *q.mlp_records(src, 0, rows), q.bits, q.base.bundle(out, 0, rows), backend))
    return jobs


def record_jobs(q: QuantLayout, raw: torch.Tensor, out_bundle: torch.Tensor, backend: str) -> list:
    """Records at the start of `raw` (a slot holding complement rows) into out_bundle [n, 3, H]."""
    n = out_bundle.shape[0]
    return [partial(dequantize, *q.records(raw, n), q.bits, out_bundle, backend)] if n else []


def dequantize_layer(q: QuantLayout, src: torch.Tensor, out: torch.Tensor, rows: int, backend: str) -> None:
    for job in dequantize_jobs(q, src, out, rows, backend):
        job()


def quantized_fraction(q: QuantLayout, dtype_bytes: int) -> float:
    """Bytes of a quantized layer relative to the same layer in a dtype of `dtype_bytes`."""
    return q.numel / (q.base.numel * dtype_bytes)


"""Quantized layers as data: one flat uint8 buffer per layer, its neurons still a byte prefix.

The host store, streaming slots, resident layers and resident prefixes of a quantized model
hold bytes laid out by `QuantLayout`, dequantized for a pass by `ferry.model.dequant`. The row
format (int4: codes, fp16 scales and fp16 mins per group; int8: codes and fp16 scales) is
defined in `ferry.kernels.quant`.

Byte layout of a layer (every section starts on a 16-byte boundary):

- attention, in `LayerLayout.shapes` order: vectors (norms, q/k/v bias) as fp32 values;
  matrices (qkv [q + 2 kv, H], o [H, q]) as all rows' codes [R, C * bits / 8], then all rows'
  fp16 scales [R, C / group], then (int4) all rows' fp16 mins [R, C / group];
- `down_groups`: down_proj's fp16 scales (then mins) [I / group, H]: down_proj [H, I] is
  quantized in groups along I, across neurons, as every source stores it (GGUF, AWQ, GPTQ);
- the MLP: one fixed-size record per neuron, in neuron order: the codes of its gate row, up row
  and down column [3, H * bits / 8], then the gate and up rows' scales [2, H / group], then
  (int4) their mins, then the neuron's index in the checkpoint (int32), which names its down
  group; padded to a multiple of 16 bytes.

Neurons 0..k-1 are therefore a byte prefix of the layer (the down group table is in the
attention part, which every pass reads): a sparse step's fetch is one contiguous copy, resident
prefixes work as before, and Griffin's reorder is a row gather of whole records, the index
travelling with its neuron. The layout exposes the interface the executor and the planner use
for unquantized layers (`numel`, `prefix_numel`, `mlp_offset`, `row_numel`), counted in bytes.

Keeping down_proj's groups across neurons is what lets a quantized source keep every matrix
exactly, down included (a layout with per-neuron down groups had to quantize down a second time,
measured at +8.1% NLL on the default model). It costs a sparse step the table's rows of the
neurons it skips (1/8 byte per down weight at groups of 32), and dequantizing a down column
gathers its group's scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.errors import SettingError
from ferry.kernels.quant import Grouped, pack_int4
from ferry.kernels.quant_fit import fit_groups
from ferry.model.config import ModelConfig
from ferry.model.weights import LayerLayout

QUANTS = ("auto", "none", "int8", "int4")
HEAD_QUANTS = ("auto", "none", "int8")
HEAD_GROUPS = (256, 128, 64, 32)  # the int4 kernel's group sizes (the head runs on it as int8)
BITS = {"int8": 8, "int4": 4}
MIN_GROUP, GROUP_STEP = 32, 8  # groups are multiples of 8 values so every section stays aligned
DEFAULT_GROUP = 32
ALIGN = 16


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the decoder layers' linear weights (the host copy).

    auto: a quantized checkpoint keeps its bits (see `for_source`), an unquantized one stays
    unquantized. int8/int4: ferry quantizes (or keeps a source that already matches)."""

    method: str = "auto"
    group_size: int = DEFAULT_GROUP  # the largest group; a row's group is the largest that divides it
    fit: bool = True  # search each group's range for the least weight error (else plain min/max)
    lm_head: str = "auto"  # int8 or none; auto: int8 exactly when the layers are quantized

    def __post_init__(self) -> None:
        if self.method not in QUANTS:
            raise SettingError("quant", f"must be one of {', '.join(QUANTS)}, got {self.method!r}")
        if self.lm_head not in HEAD_QUANTS:
            raise SettingError("quant_lm_head", f"must be one of {', '.join(HEAD_QUANTS)}, got {self.lm_head!r}")
        if (not isinstance(self.group_size, int) or self.group_size < MIN_GROUP
                or self.group_size > 1024 or self.group_size % GROUP_STEP):
            raise SettingError("quant_group", f"must be a multiple of {GROUP_STEP} in [{MIN_GROUP}, 1024], "
                               f"got {self.group_size}")

    @property
    def enabled(self) -> bool:
        if self.method == "auto":
            raise ValueError("resolve quant='auto' with for_source before use")
        return self.method != "none"

    @property
    def bits(self) -> int:
        return BITS[self.method]

    def for_source(self, source: tuple[int, int] | None) -> "QuantConfig":
        """auto resolved against what the checkpoint stores: (bits, group) of its grouped layer
        weights, or None for float weights."""
        if self.method != "auto":
            return self
        if source is None:
            return QuantConfig("none", self.group_size, self.fit, self.lm_head)
        bits, group = source
        return QuantConfig(f"int{bits}", group, self.fit, self.lm_head)

    @property
    def head_quantized(self) -> bool:
        """Whether lm_head is held as int8 groups (resolve auto first)."""
        return self.lm_head == "int8" or (self.lm_head == "auto" and self.enabled)


def head_group(cfg: ModelConfig, quant: QuantConfig) -> int:
    """lm_head's int8 group: the largest kernel group, at most quant.group_size (32 at least),
    dividing the hidden size; 0 when none does (the head then stays in the compute dtype)."""
    return next((g for g in HEAD_GROUPS if g <= max(MIN_GROUP, quant.group_size) and cfg.hidden_size % g == 0), 0)


def group_for(cfg: ModelConfig, quant: QuantConfig) -> int:
    """The group size for this model: the largest multiple of 8, at most quant.group_size and at
    least 32, dividing every stored row (qkv, gate and up rows have H values, o rows q, down rows
    I)."""
    rows = {cfg.hidden_size, cfg.q_size, cfg.intermediate_size}
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
    sections: tuple[Section, ...]  # the attention part, in base.shapes order, then "down_groups"
    mlp_offset: int  # bytes before the first neuron record

    @classmethod
    def for_config(cls, cfg: ModelConfig, quant: QuantConfig) -> "QuantLayout":
        base, bits, group = LayerLayout.for_config(cfg), quant.bits, group_for(cfg, quant)
        sections, offset = [], 0
        for name, shape in base.shapes:
            size = 4 * shape[0] if len(shape) == 1 else shape[0] * row_bytes(shape[1], bits, group)
            sections.append(Section(name, shape, offset, size))
            offset = _aligned(offset + size)
        # down_proj's scales (and mins): groups of `group` neurons per hidden row, group-major
        table = (cfg.intermediate_size // group, cfg.hidden_size)
        sections.append(Section("down_groups", table, offset, table[0] * table[1] * (2 if bits == 8 else 4)))
        return cls(base, bits, group, tuple(sections), _aligned(offset + sections[-1].size))

    @property
    def intermediate_size(self) -> int:
        return self.base.intermediate_size

    @property
    def hidden_size(self) -> int:
        return self.base.hidden_size

    @property
    def index_offset(self) -> int:
        """Where a record's checkpoint index (int32) sits: after its codes, scales and mins."""
        h = self.hidden_size
        return 3 * h * self.bits // 8 + 2 * (h // self.group) * (2 if self.bits == 8 else 4)

    @property
    def row_numel(self) -> int:
        """Bytes of one neuron record: gate, up and down codes, gate and up scales (and mins),
        and the neuron's index in the checkpoint (which down group it belongs to), padded to 16
        bytes so every record starts aligned (a GPU kernel's wide loads need it)."""
        return _aligned(self.index_offset + 4)

    def prefix_numel(self, rows: int) -> int:
        """Bytes of the attention part plus the first `rows` neuron records."""
        return self.mlp_offset + rows * self.row_numel

    @property
    def numel(self) -> int:
        return self.prefix_numel(self.intermediate_size)

    def section(self, name: str) -> Section:
        return next(sec for sec in self.sections if sec.name == name)

    def matrix(self, flat: torch.Tensor, sec: Section) -> tuple:
        """(codes [R, Cb], scales fp16 [R, G], mins fp16 [R, G] or None) of a matrix section."""
        r, c = sec.shape
        codes, scales, mins = self._cut(flat[sec.offset:sec.offset + sec.size].view(1, -1), r, c)
        return codes[0], scales[0], None if mins is None else mins[0]

    def down_groups(self, flat: torch.Tensor) -> tuple:
        """(scales fp16 [I / group, H], mins or None): down_proj's groups, for every neuron."""
        sec = self.section("down_groups")
        raw = flat[sec.offset:sec.offset + sec.size].view(torch.float16).view(2 if self.bits == 4 else 1, *sec.shape)
        return raw[0], raw[1] if self.bits == 4 else None

    def records(self, raw: torch.Tensor, n: int) -> tuple:
        """(codes [n, 3, Hb], gate/up scales [n, 2, G], mins [n, 2, G] or None, index int32 [n])
        of n records at raw[0]."""
        rec = raw[:n * self.row_numel].view(n, self.row_numel)
        h = self.hidden_size
        cb, g = 3 * h * self.bits // 8, h // self.group
        codes = rec[:, :cb].view(n, 3, -1)
        scales = rec[:, cb:cb + 4 * g].view(torch.float16).view(n, 2, g)
        mins = rec[:, cb + 4 * g:cb + 8 * g].view(torch.float16).view(n, 2, g) if self.bits == 4 else None
        return codes, scales, mins, rec[:, self.index_offset:self.index_offset + 4].view(torch.int32).view(n)

    def _cut(self, raw: torch.Tensor, rows: int, c: int) -> tuple:
        """Codes, scales and mins of each of raw's records [N, bytes], each `rows` rows of c values."""
        n, cb, g = raw.shape[0], rows * c * self.bits // 8, rows * c // self.group
        codes = raw[:, :cb].view(n, rows, -1)
        scales = raw[:, cb:cb + 2 * g].view(torch.float16).view(n, rows, -1)
        mins = raw[:, cb + 2 * g:cb + 4 * g].view(torch.float16).view(n, rows, -1) if self.bits == 4 else None
        return codes, scales, mins

    def mlp_records(self, flat: torch.Tensor, lo: int, hi: int) -> tuple:
        """Records lo..hi-1 of a buffer laid out like a whole layer."""
        return self.records(flat[self.mlp_offset + lo * self.row_numel:], hi - lo)


def row_bytes(c: int, bits: int, group: int) -> int:
    """Bytes of one stored row of c values: codes, fp16 scales and (int4) fp16 mins."""
    return c * bits // 8 + (2 if bits == 8 else 4) * (c // group)


def _write(parts: tuple, grouped: Grouped) -> None:
    for dst, src in zip(parts, grouped.packed()):
        if dst is not None:
            dst.copy_(src.view(dst.shape) if src.dim() == dst.dim() - 1 else src)


def write_matrix(q: QuantLayout, out: torch.Tensor, name: str, grouped: Grouped, rows: slice = slice(None)) -> None:
    """Rows `rows` of the matrix section `name` of `out` from quantized groups."""
    check_grouped(q, grouped, name)
    codes, scales, mins = q.matrix(out, q.section(name))
    _write((codes[rows], scales[rows], None if mins is None else mins[rows]), grouped)


def write_records(q: QuantLayout, out: torch.Tensor, lo: int, gate: Grouped, up: Grouped) -> None:
    """Neurons lo.. of `out`: their gate and up rows (down is `write_down`'s)."""
    n = gate.shape[0]
    codes, scales, mins, index = q.mlp_records(out, lo, lo + n)
    for i, grouped in enumerate((gate, up)):
        check_grouped(q, grouped, ("gate", "up")[i])
        _write((codes[:, i], scales[:, i], None if mins is None else mins[:, i]), grouped)
    index.copy_(torch.arange(lo, lo + n, dtype=torch.int32))


def write_down(q: QuantLayout, out: torch.Tensor, down: Grouped) -> None:
    """down_proj [H, I], in groups along I (across neurons, as every source stores it): each
    neuron's codes go to its record, the groups' scales (and mins) to the layer's table."""
    check_grouped(q, down, "down")
    codes = q.mlp_records(out, 0, q.intermediate_size)[0][:, 2]
    columns = down.q.t()  # [I, H]: neuron j's down column
    codes.copy_(columns.view(torch.uint8) if q.bits == 8 else pack_int4(columns))
    scales, mins = q.down_groups(out)
    scales.copy_(down.scale.t())
    if mins is not None:
        mins.copy_(down.minimum.t())


def check_grouped(q: QuantLayout, grouped: Grouped, what: str) -> None:
    if grouped.bits != q.bits or grouped.group != q.group:
        raise ValueError(f"{what}: int{grouped.bits} groups of {grouped.group} do not fit a layer of "
                         f"int{q.bits} groups of {q.group}")


QUANT_CHUNK_ROWS = 1024  # rows quantized at a time (bounds the fp32 temporaries)


def quantize_layer(q: QuantLayout, full: torch.Tensor, out: torch.Tensor, fit: bool = True) -> None:
    """Quantize a layer packed in the unquantized layout (`full`, any float dtype) into `out` (uint8)."""
    views = q.base.attention_views(full)
    for sec in q.sections:
        if sec.name == "down_groups":
            continue
        src = views[sec.name]
        if len(sec.shape) == 1:
            out[sec.offset:sec.offset + sec.size].view(torch.float32).copy_(src)
            continue
        for lo in range(0, sec.shape[0], QUANT_CHUNK_ROWS):
            rows = slice(lo, min(lo + QUANT_CHUNK_ROWS, sec.shape[0]))
            write_matrix(q, out, sec.name, fit_groups(src[rows], q.bits, q.group, fit), rows)
    n = q.intermediate_size
    for lo in range(0, n, QUANT_CHUNK_ROWS):
        bundle = q.base.bundle(full, lo, min(n, lo + QUANT_CHUNK_ROWS))
        write_records(q, out, lo, *(fit_groups(bundle[:, i], q.bits, q.group, fit) for i in range(2)))
    write_down(q, out, fit_groups(q.base.bundle(full, 0, n)[:, 2].t(), q.bits, q.group, fit))

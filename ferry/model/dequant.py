"""Quantized layer bytes computed through the compute dtype, a tile at a time: what a pass runs on
a quantized layer the packed kernel does not take (streamed layers, resident prefixes, devices
without the kernel). The layout is `ferry.model.quant.QuantLayout`.

A pass's weights are views of the quantized bytes (`quant_views`): `QuantRows` for qkv and o,
`QuantNeurons` for MLP records. Where `ferry.kernels.gemv` runs (CUDA, a few tokens at a time)
each product reads the bytes in place. Otherwise it dequantizes one tile of rows (or of neurons:
gate, up and down column together) into a shared workspace and runs the plain math on it, so
the device holds one tile in the compute dtype, never a dequantized layer (`tile_numel`). The MLP
over tiles of neurons is exact: the MLP over a partition of the neurons is the sum of the
parts' MLPs. Norms and biases are copied into small buffers when a layer is acquired.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ferry.kernels import gemv
from ferry.kernels.quant import dequantize, unpack_int4
from ferry.kernels.reference import bundled_mlp, gated
from ferry.model.quant import QuantLayout
from ferry.model.weights import LayerLayout, LayerWeights

TILE_VALUES = 16 << 20  # values of the compute dtype one tile holds at most (32 MiB in bf16)


def tile_numel(layout: LayerLayout) -> int:
    """Workspace (values) for the tiles of a layer: 16M values, at least 64 neurons' rows, at
    most the layer itself."""
    return min(layout.numel, max(TILE_VALUES, 64 * layout.row_numel))


def dequantize_down(codes: torch.Tensor, index: torch.Tensor, table: tuple, bits: int, group: int,
                    out: torch.Tensor) -> torch.Tensor:
    """Down columns [n, H] of records (codes [n, Hb], checkpoint indices [n]) through the layer's
    group table: w[j, h] = q * scale[g(j), h] (+ min[g(j), h]) with g(j) = index[j] // group.
    fp32 math, one rounding (torch; the gather makes [n, H] temporaries)."""
    rows = index.long() // group
    q = codes.view(torch.int8) if bits == 8 else unpack_int4(codes)
    x = q.float() * table[0][rows].float()
    if table[1] is not None:
        x += table[1][rows].float()
    return out.copy_(x)


def dequantize_records(q: QuantLayout, records: tuple, table: tuple, bundle: torch.Tensor, backend: str) -> None:
    """Records (codes [n, 3, Hb], scales, mins, index) into bundle [n, 3, H]."""
    codes, scales, mins, index = records
    dequantize(codes[:, :2], scales, mins, q.bits, bundle[:, :2], backend)
    dequantize_down(codes[:, 2], index, table, q.bits, q.group, bundle[:, 2])


@dataclass(frozen=True)
class QuantRows:
    """A quantized matrix [R, C]: codes, scales and mins are views of a layer's bytes."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bits: int
    work: torch.Tensor  # the shared tile workspace (flat, compute dtype)
    backend: str

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return rows_linear(x, self.codes, self.scales, self.mins, self.bits, self.work, self.backend)


def rows_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                bits: int, work: torch.Tensor, backend: str) -> torch.Tensor:
    """x @ wᵀ for quantized rows (codes, scales, mins): in place where `gemv` runs, else as many
    rows at a time as `work` (flat, compute dtype) holds, dequantized and multiplied."""
    if gemv.usable(x):
        return gemv.rows_linear(x, codes, scales, mins, bits)
    r, c = codes.shape[0], x.shape[1]
    out = x.new_empty(x.shape[0], r)
    step = max(1, work.numel() // c)
    for lo in range(0, r, step):
        hi = min(r, lo + step)
        w = work[:(hi - lo) * c].view(hi - lo, c)
        dequantize(codes[lo:hi], scales[lo:hi], None if mins is None else mins[lo:hi], bits, w, backend)
        out[:, lo:hi] = F.linear(x, w)
    return out


@dataclass(frozen=True)
class QuantNeurons:
    """n MLP neuron records (views of a layer's or a slot's bytes) and the layer's down table."""

    layout: QuantLayout
    records: tuple  # codes [n, 3, Hb], gate/up scales [n, 2, G], mins or None, index [n]
    table: tuple  # down_proj's (scales, mins) [I / group, H]
    work: torch.Tensor
    backend: str

    def mlp(self, x: torch.Tensor, threshold: float | None = None, observe=None) -> torch.Tensor:
        """`bundled_mlp` over these neurons: on the records in place where the kernels run, else
        tile by tile (an observer sees each tile's activations in turn)."""
        if not gemv.usable(x):
            out = x.new_zeros(x.shape)
            for bundle in self.tiles():
                out += bundled_mlp(x, bundle, threshold, observe)
            return out
        codes, scales, mins, index = self.records
        bits, group = self.layout.bits, self.layout.group
        # gate and up rows in one launch; the down product forms SiLU(gate) * up itself
        gate_up = gemv.rows_linear(x, codes[:, :2], scales, mins, bits)  # [M, 2, n]
        if observe is None:
            return gemv.columns_linear(gate_up, codes[:, 2], index, self.table, bits, group, threshold=threshold)
        a, z = gated(gate_up[:, 0], gate_up[:, 1], threshold)
        observe(a, z)
        return gemv.columns_linear(z, codes[:, 2], index, self.table, bits, group)

    def tiles(self):
        """Bundles [t, 3, H] of consecutive neurons, each dequantized into the workspace just
        before it is yielded (so one tile is live at a time)."""
        n, h = self.records[0].shape[0], self.layout.hidden_size
        step = max(1, self.work.numel() // (3 * h))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            bundle = self.work[:(hi - lo) * 3 * h].view(hi - lo, 3, h)
            part = tuple(None if t is None else t[lo:hi] for t in self.records)
            dequantize_records(self.layout, part, self.table, bundle, self.backend)
            yield bundle


def vector_buffers(layout: LayerLayout, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Buffers for a layer's norms and biases in the compute dtype."""
    return {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in layout.shapes if len(shape) == 1}


def vector_jobs(q: QuantLayout, src: torch.Tensor, vectors: dict[str, torch.Tensor]) -> list:
    """The copies that bring a layer's norms and biases (fp32 in its bytes) into `vectors`."""
    return [partial(torch.Tensor.copy_, vectors[sec.name], src[sec.offset:sec.offset + sec.size].view(torch.float32))
            for sec in q.sections if len(sec.shape) == 1]


def converted_vectors(q: QuantLayout, flat: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's norms and biases (fp32 in its bytes) as tensors of their own in `dtype`."""
    return {sec.name: flat[sec.offset:sec.offset + sec.size].view(torch.float32).to(dtype, copy=True)
            for sec in q.sections if len(sec.shape) == 1}


def quant_views(q: QuantLayout, src: torch.Tensor, vectors: dict[str, torch.Tensor], rows: int,
                work: torch.Tensor, backend: str, complement: torch.Tensor | None = None) -> LayerWeights:
    """A pass's weights over a quantized layer: its attention part and neurons 0..rows-1 in `src`
    (possibly only that prefix); `complement`, a slot holding the records of the neurons after
    them, adds those (the table is in `src`'s attention part)."""
    mats = {sec.name: QuantRows(*q.matrix(src, sec), q.bits, work, backend)
            for sec in q.sections if len(sec.shape) == 2 and sec.name != "down_groups"}
    table = q.down_groups(src)
    mlp = (QuantNeurons(q, q.mlp_records(src, 0, rows), table, work, backend),)
    if complement is not None:
        mlp += (QuantNeurons(q, q.records(complement, q.intermediate_size - rows), table, work, backend),)
    return LayerWeights(attn_norm=vectors["attn_norm"], qkv=mats["qkv"], qkv_bias=vectors.get("qkv_bias"),
                        o=mats["o"], mlp_norm=vectors["mlp_norm"], mlp=mlp)


def dequantize_layer(q: QuantLayout, src: torch.Tensor, out: torch.Tensor, rows: int, backend: str) -> None:
    """The attention part and neurons 0..rows-1 of `src` into `out`, laid out like an unquantized
    layer (the plain reference the tiled and packed paths are tested against)."""
    views = q.base.attention_views(out)
    for sec in q.sections:
        if sec.name == "down_groups":
            continue
        if len(sec.shape) == 1:
            views[sec.name].copy_(src[sec.offset:sec.offset + sec.size].view(torch.float32))
        else:
            dequantize(*q.matrix(src, sec), q.bits, views[sec.name], backend)
    if rows:
        dequantize_records(q, q.mlp_records(src, 0, rows), q.down_groups(src), q.base.bundle(out, 0, rows), backend)

"""Resident quantized layers in the packed-kernel form: matrix products read the 4-bit codes where
they lie (`ferry.kernels.int4pack`), with no dequantized copy of the layer.

A layer is packed once from its `QuantLayout` bytes (loading) and its neurons are permuted in
place of the records' gather when Griffin reorders them. What each matrix becomes:

- qkv, o, gate and up: rows as stored, groups along the input, as the kernel wants them;
- down_proj [H, I] stays in checkpoint order, because its groups run across neurons: the MLP
  scatters the used neurons' activations to their checkpoint positions (zeros elsewhere) and
  runs one product over the whole of down. A sparse step therefore reads all of down's codes
  (a third of the MLP) and a prefix of gate and up.

A sparse step over the first k neurons uses the first whole blocks of gate and up covering k;
the padding neurons' activations are zeroed before the down product, so the result is exactly
that of k neurons.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ferry.kernels import int4pack
from ferry.kernels.int4pack import BLOCK, Int4Matrix, int4_linear, int4_matrix, int8_matrix
from ferry.kernels.quant import unpack_int4
from ferry.model.quant import QuantLayout
from ferry.model.weights import LayerWeights

ENABLED: bool | None = None  # None: wherever the kernel takes the layer; False forces dequantization


@dataclass(frozen=True)
class PackedMatrix:
    """W [N, K] as the sum of its int4 parts (one for int4 weights, two for int8)."""

    parts: tuple[Int4Matrix, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.parts[0].shape

    def prefix(self, rows: int) -> "PackedMatrix":
        return PackedMatrix(tuple(p.prefix(rows) for p in self.parts))

    def permuted(self, order: torch.Tensor) -> "PackedMatrix":
        """Rows in `order` (whole blocks only)."""
        return PackedMatrix(tuple(Int4Matrix(int4pack.pack(int4pack.unpack(p.packed)[order]),
                                             p.table[:, order].contiguous(), p.group) for p in self.parts))


def packed_matrix(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
                  dtype: torch.dtype) -> PackedMatrix:
    """From the row format of `ferry.kernels.quant` (codes [N, K * bits / 8], scales/mins [N, G])."""
    if bits == 4:
        return PackedMatrix((int4_matrix(unpack_int4(codes), scales, mins, dtype),))
    return PackedMatrix(int8_matrix(codes.view(torch.int8), scales, dtype))


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ (+ bias) for a plain weight tensor or a packed matrix."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    out = int4_linear(x, w.parts)
    return out if bias is None else out + bias


@dataclass(frozen=True)
class PackedMLP:
    """The MLP over neurons 0..rows-1 of a packed layer."""

    gate: PackedMatrix  # [whole blocks >= rows, H], neurons in the layer's current order
    up: PackedMatrix
    down: PackedMatrix  # [H, I] in checkpoint order
    index: torch.Tensor  # int64: checkpoint position of each of gate's neurons
    rows: int


def packed_mlp(x: torch.Tensor, mlp: PackedMLP, threshold: float | None = None, observe=None) -> torch.Tensor:
    """down(SiLU(gate(x)) * up(x)) over the first mlp.rows neurons: `bundled_mlp`'s result."""
    a = F.silu(linear(x, mlp.gate))
    if threshold is not None:
        a = a * (a.abs() >= threshold)
    z = a * linear(x, mlp.up)
    if z.shape[1] > mlp.rows:  # neurons past `rows` only pad a block: they contribute nothing
        z[:, mlp.rows:] = 0
    if observe is not None:
        observe(a[:, :mlp.rows], z[:, :mlp.rows])
    spread = z.new_zeros(x.shape[0], mlp.down.shape[1]).index_copy_(1, mlp.index, z)
    return linear(spread, mlp.down)


@dataclass(frozen=True)
class PackedLayer:
    """One decoder layer, every matrix packed; `weights(rows)` gives the views a pass reads."""

    attention: dict  # attn_norm, qkv, qkv_bias, o, mlp_norm (vectors in the compute dtype)
    gate: PackedMatrix
    up: PackedMatrix
    down: PackedMatrix
    index: torch.Tensor  # int64 [I]: checkpoint position of each neuron, in the current order

    def weights(self, rows: int, threshold: float | None = None) -> LayerWeights:
        blocks = min(self.index.shape[0], -(-rows // BLOCK) * BLOCK)
        gate, up = (self.gate, self.up) if blocks == self.index.shape[0] else \
            (self.gate.prefix(blocks), self.up.prefix(blocks))
        mlp = PackedMLP(gate, up, self.down, self.index[:blocks], rows)
        return LayerWeights(**self.attention, mlp=(mlp,), mlp_threshold=threshold)

    def reordered(self, order: torch.Tensor) -> "PackedLayer":
        """Neurons in `order` (a permutation of the current order), as Griffin's reorder wants."""
        return replace(self, gate=self.gate.permuted(order), up=self.up.permuted(order), index=self.index[order])


def can_pack(q: QuantLayout, device: torch.device) -> bool:
    """Whether every matrix of a layer in this layout takes the kernel on this device."""
    if ENABLED is False:
        return False
    h, i, g = q.hidden_size, q.intermediate_size, q.group
    shapes = [(sec.shape, False) for sec in q.sections if len(sec.shape) == 2 and sec.name != "down_groups"]
    shapes += [((i, h), True), ((h, i), False)]
    return all(int4pack.supported(n, k, g, device, reordered) for (n, k), reordered in shapes)


def pack_layer(q: QuantLayout, flat: torch.Tensor, dtype: torch.dtype) -> PackedLayer:
    """A layer's `QuantLayout` bytes (any neuron order) in the packed form."""
    attention = {"qkv_bias": None}
    for sec in q.sections:
        if sec.name == "down_groups":
            continue
        if len(sec.shape) == 1:
            attention[sec.name] = flat[sec.offset:sec.offset + sec.size].view(torch.float32).to(dtype)
        else:
            attention[sec.name] = packed_matrix(*q.matrix(flat, sec), q.bits, dtype)
    codes, scales, mins, index = q.mlp_records(flat, 0, q.intermediate_size)
    gate, up = (packed_matrix(codes[:, j], scales[:, j], None if mins is None else mins[:, j], q.bits, dtype)
                for j in range(2))
    index = index.long()
    return PackedLayer(attention, gate, up, _down(q, flat, codes[:, 2], index, dtype), index)


def _down(q: QuantLayout, flat: torch.Tensor, columns: torch.Tensor, index: torch.Tensor,
          dtype: torch.dtype) -> PackedMatrix:
    """down_proj [H, I] in checkpoint order from the records' columns and the layer's group table."""
    values = unpack_int4(columns) if q.bits == 4 else columns.view(torch.int8)  # [I, H], record order
    ordered = torch.empty_like(values)
    ordered[index] = values
    scales, mins = q.down_groups(flat)  # [I / group, H]
    if q.bits == 4:
        return PackedMatrix((int4_matrix(ordered.t().contiguous(), scales.t(), mins.t(), dtype),))
    return PackedMatrix(int8_matrix(ordered.t().contiguous(), scales.t(), dtype))

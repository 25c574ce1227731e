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

from ferry.kernels import decode_cpu, int4pack
from ferry.kernels.int4pack import BLOCK, Int4Matrix, int4_linear, int4_matrix, int8_matrix
from ferry.kernels.quant import pick_backend, unpack_int4
from ferry.kernels.reference import gated
from ferry.model.dequant import converted_vectors, rows_linear
from ferry.model.quant import QuantLayout
from ferry.model.weights import LayerWeights

# None: wherever the kernel takes the layer in bf16 (its fast path; its fp32 path is exact but
# slower than dequantizing); True: in any dtype (tests compare with the reference in fp32);
# False: never (the dequantizing path everywhere)
ENABLED: bool | None = None


def use_kernel(dtype: torch.dtype) -> bool:
    return ENABLED is True or (ENABLED is None and dtype == torch.bfloat16)


@dataclass(frozen=True)
class PackedMatrix:
    """W [N, K] as the sum of its int4 parts (one for int4 weights, two for int8)."""

    parts: tuple[Int4Matrix, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.parts[0].shape

    def prefix(self, rows: int) -> "PackedMatrix":
        return PackedMatrix(tuple(p.prefix(rows) for p in self.parts))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.parts)

    def permuted(self, order: torch.Tensor, places: torch.Tensor) -> "PackedMatrix":
        """Rows in `order` (whole blocks only), which moves the rows `places` (ascending). When
        they are few, in place: this matrix, its rows moved."""
        if 4 * places.numel() > self.shape[0]:  # a pass over every row is quicker
            return PackedMatrix(tuple(Int4Matrix(int4pack.permute_rows(p.packed, order),
                                                 torch.index_select(p.table, 1, order), p.group) for p in self.parts))
        for p in self.parts:
            int4pack.move_rows_(p.packed, order, places)
            p.table.index_copy_(1, places, p.table.index_select(1, order[places]))
        return self


def packed_matrix(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
                  dtype: torch.dtype) -> PackedMatrix:
    """From the row format of `ferry.kernels.quant` (codes [N, K * bits / 8], scales/mins [N, G])."""
    if bits == 4:
        return PackedMatrix((int4_matrix(unpack_int4(codes), scales, mins, dtype),))
    return PackedMatrix(int8_matrix(codes.view(torch.int8), scales, dtype))


@dataclass(frozen=True)
class GroupedMatrix:
    """W [N, K] as int8 groups (w = q * scale), what a device without the packed kernel runs a
    quantized lm_head on: read in place by `ferry.kernels.gemv` where it runs, else dequantized
    a tile of rows at a time for each product."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # fp16 [N, K / group]
    tile: torch.Tensor  # [TILE_ROWS or N, K] in the compute dtype: the rows dequantized at a time

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return rows_linear(x, self.q.view(torch.uint8), self.scale, None, 8, self.tile.view(-1),
                           pick_backend(x.device, x.dtype))


TILE_ROWS = 4096  # rows of a GroupedMatrix dequantized at a time (the workspace it needs)


def int8_head(shape: tuple[int, int], group: int, blocks, device: torch.device,
              dtype: torch.dtype) -> "PackedMatrix | GroupedMatrix":
    """lm_head [V, H] from int8 `Grouped` row blocks (`blocks` yields (first row, Grouped), each
    block a whole number of 64-row blocks but the last): packed for the kernel where it takes
    the shape, else kept as groups and dequantized by tiles."""
    v, h = shape
    if use_kernel(dtype) and int4pack.supported(v, h, group, device):
        parts = [Int4Matrix(torch.empty(v, h // 2, dtype=torch.uint8), torch.empty(h // group, v, 2, dtype=dtype), group)
                 for _ in range(2)]
        for lo, grouped in blocks:
            for part, block in zip(parts, int8_matrix(grouped.q, grouped.scale, dtype)):
                part.packed[lo:lo + block.shape[0]] = block.packed
                part.table[:, lo:lo + block.shape[0]] = block.table
        return PackedMatrix(tuple(parts))
    q = torch.empty(v, h, dtype=torch.int8, device=device)
    scale = torch.empty(v, h // group, dtype=torch.float16, device=device)
    for lo, grouped in blocks:
        q[lo:lo + grouped.shape[0]] = grouped.q.to(device)
        scale[lo:lo + grouped.shape[0]] = grouped.scale.to(device)
    return GroupedMatrix(q, scale, torch.empty(min(TILE_ROWS, v), h, dtype=dtype, device=device))


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
    gate, up = mlp.gate.linear(x), mlp.up.linear(x)
    if observe is None and decode_cpu.usable(x):  # one token: activations and spread in one call
        return mlp.down.linear(decode_cpu.gated_scatter(gate, up, mlp.rows, mlp.index, threshold, mlp.down.shape[1]))
    a, z = gated(gate, up, threshold)
    if z.shape[1] > mlp.rows:  # neurons past `rows` only pad a block: they contribute nothing
        z[:, mlp.rows:] = 0
    if observe is not None:
        observe(a[:, :mlp.rows], z[:, :mlp.rows])
    spread = z.new_zeros(x.shape[0], mlp.down.shape[1]).index_copy_(1, mlp.index, z)
    return mlp.down.linear(spread)


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

    def reordered(self, order: torch.Tensor, places: torch.Tensor) -> "PackedLayer":
        """Neurons in `order` (a permutation of the current order, moving the neurons at
        `places`), as Griffin's reorder wants; gate and up may be moved in place."""
        return replace(self, gate=self.gate.permuted(order, places), up=self.up.permuted(order, places),
                       index=self.index[order])


def can_pack(q: QuantLayout, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether every matrix of a layer in this layout takes the kernel on this device."""
    if not use_kernel(dtype):
        return False
    h, i, g = q.hidden_size, q.intermediate_size, q.group
    shapes = [(sec.shape, False) for sec in q.sections if len(sec.shape) == 2 and sec.name != "down_groups"]
    shapes += [((i, h), True), ((h, i), False)]
    return all(int4pack.supported(n, k, g, device, reordered) for (n, k), reordered in shapes)


def pack_layer(q: QuantLayout, flat: torch.Tensor, dtype: torch.dtype) -> PackedLayer:
    """A layer's `QuantLayout` bytes (any neuron order) in the packed form."""
    attention = {"qkv_bias": None, **converted_vectors(q, flat, dtype)}
    for sec in q.sections:
        if len(sec.shape) == 2 and sec.name != "down_groups":
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

"""Where each layer's weights live, what a pass must move of them, and the views the math reads.

Every forward pass is one of two kinds (`Kind`): FULL uses all MLP neurons (prefill, dense
steps, the correction pass), SPARSE only the selected ones. After Griffin reorders each layer's
neurons the selected ones come first, so the attention weights plus the selected neurons are a
*prefix* of the layer's flat buffer, and per layer and kind the bytes to move are one contiguous
range of its host buffer (`fetch_span`, the one rule the planner's schedule and the executor
share). A layer is in one of three places:

- resident (`Where.RESIDENT`): the whole layer is on the device; nothing moves;
- prefix-resident (`Where.PREFIX`): attention and the selected neurons stay on the device, the
  rest in host memory; SPARSE moves nothing, FULL moves the complement of the prefix;
- streamed (`Where.STREAMED`): the layer is in host memory; SPARSE moves the prefix, FULL the
  whole layer. With CATS thresholds the neurons a token skips are chosen per token, so SPARSE
  moves the whole layer too.

Quantized weights (`quant`): host buffers, slots and resident prefixes hold the bytes of
`QuantLayout` (the ranges above are then byte ranges); a pass over such a layer reads them in
place where `ferry.kernels.gemv` runs (CUDA), else dequantizes one tile at a time into a small
workspace (`ferry.model.dequant`). Resident layers are packed once for the CPU's int4 kernel
where it takes them (`ferry.model.packed`), else kept as `QuantLayout` bytes like the others,
with their norms and biases converted once. Either way they stay quantized, which is what lets a
large selected set fit on the device.
"""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from typing import Callable, Sequence

import torch

from ferry.kernels.gather import gather_rows, moved_rows, scatter_rows
from ferry.model.dequant import converted_vectors, quant_views, tile_numel, vector_buffers, vector_jobs
from ferry.model.packed import PackedLayer, can_pack, pack_layer
from ferry.model.quant import QuantLayout
from ferry.model.weights import Kind, LayerLayout, LayerWeights
from ferry.offload.slots import SlotPool
from ferry.offload.transfer import Link


class Where(str, Enum):
    """Where a layer's weights are kept between passes."""

    RESIDENT = "resident"
    PREFIX = "prefix-resident"
    STREAMED = "streamed"


def fetch_span(where: Where, kind: Kind, prefix: int, whole: int, per_token: bool) -> tuple[int, int] | None:
    """The range of a layer's host buffer a pass of `kind` moves (None: nothing).

    prefix, whole: sizes of the selected prefix and of the whole layer (elements or bytes alike);
    per_token: SPARSE passes choose their neurons per token (CATS), so they read every row.
    """
    if where == Where.RESIDENT:
        return None
    if where == Where.PREFIX:  # the prefix is on the device; FULL brings the rest
        return None if kind == Kind.SPARSE or prefix == whole else (prefix, whole)
    return (0, prefix) if kind == Kind.SPARSE and not per_token else (0, whole)


def stored_as(layout: LayerLayout, quant: QuantLayout | None,
              dtype: torch.dtype) -> tuple[LayerLayout | QuantLayout, torch.dtype]:
    """How host buffers, slots and resident copies lay a layer out: quantized records as bytes,
    or the compute dtype."""
    return (quant, torch.uint8) if quant is not None else (layout, dtype)


class LayerStore:
    """The layers' buffers (resident, host, resident prefixes, and the slot pool streamed layers
    pass through) and the weight views of each (layer, kind, slot)."""

    def __init__(
        self, layout: LayerLayout, resident: dict[int, torch.Tensor], host: dict[int, torch.Tensor],
        slots: SlotPool, link: Link, device: torch.device, dtype: torch.dtype,
        prefix_layers: Sequence[int] = (), quant: QuantLayout | None = None, dequant_backend: str = "torch",
    ):
        self.layout, self.resident, self.host, self.slots, self.link = layout, resident, host, slots, link
        self.quant, self.dequant_backend, self.device = quant, dequant_backend, device
        self.fmt, self.fmt_dtype = stored_as(layout, quant, dtype)
        self.packed: dict[int, PackedLayer] = {}  # resident layers in the kernel's form
        if quant is not None and can_pack(quant, device, dtype):
            for layer in sorted(resident):  # one layer's bytes at a time: no second copy of the model
                self.packed[layer] = pack_layer(quant, resident.pop(layer), dtype)
        dequantized = quant is not None and (host or resident)
        self.work = torch.empty(tile_numel(layout), dtype=dtype, device=device) if dequantized else None  # the tile
        self.vectors = vector_buffers(layout, dtype, device) if dequantized else {}  # streamed layers'
        # resident records' norms and biases, converted once (not copied again at every pass)
        self.own_vectors = {layer: converted_vectors(quant, buf, dtype)
                            for layer, buf in resident.items()} if quant is not None else {}
        self.order = tuple(sorted(host))  # streamed layers in visiting order
        self.prefix_layers = tuple(prefix_layers)  # streamed layers whose selected prefix may stay
        self.prefix_buffers: dict[int, torch.Tensor] = {}  # the ones whose prefix is loaded now
        self.rows = layout.intermediate_size  # neurons a SPARSE pass uses (a prefix)
        self.thresholds: list[float] | None = None  # CATS thresholds for SPARSE passes
        self.epoch = 0  # bumped when a buffer the weights are read from moves (captured graphs go stale)
        self._views: dict[tuple, LayerWeights] = {}  # per (layer, kind, slot), built once
        self._jobs: dict[tuple, list[Callable[[], None]]] = {}  # vector copies of quantized layers, likewise

    # --- what a (layer, kind) needs -------------------------------------------------------
    def where(self, layer: int) -> Where:
        if layer in self.resident or layer in self.packed:
            return Where.RESIDENT
        return Where.PREFIX if layer in self.prefix_buffers else Where.STREAMED

    def fetch_range(self, layer: int, kind: Kind) -> tuple[int, int] | None:
        """The range of the layer's host buffer a pass of this kind must move (elements of the
        stored layout: bytes when quantized)."""
        return fetch_span(self.where(layer), kind, self.fmt.prefix_numel(self.rows), self.fmt.numel,
                          per_token=self.thresholds is not None)

    def moves_nothing(self, kind: Kind) -> bool:
        """Whether a pass of this kind runs on device-resident weights alone."""
        return all(self.fetch_range(layer, kind) is None for layer in self.order)

    def _sparse_rows(self, kind: Kind) -> int:
        """MLP rows a pass of this kind reads (CATS passes read them all, skipping per token)."""
        return self.rows if kind == Kind.SPARSE and self.thresholds is None else self.layout.intermediate_size

    # --- the weights a pass reads -------------------------------------------------------------
    def ready(self, layer: int, kind: Kind, slot: int | None) -> LayerWeights:
        """The layer's weights for a pass of this kind, its bytes in `slot` (None: nothing
        streamed). A quantized layer off the packed kernel gets its norms and biases copied into
        the vector buffers; its matrices are read as the math needs them (`quant_views`)."""
        key = (layer, kind, slot)
        if self.quant is not None and layer not in self.packed and layer not in self.own_vectors:
            if key not in self._jobs:
                self._jobs[key] = vector_jobs(self.quant, self._quant_source(layer, slot), self.vectors)
            for job in self._jobs[key]:
                job()
        if key not in self._views:
            self._views[key] = self._build_views(layer, kind, slot)
        return self._views[key]

    def _build_views(self, layer: int, kind: Kind, slot: int | None) -> LayerWeights:
        n, k, lay = self.layout.intermediate_size, self.rows, self.layout
        rows = self._sparse_rows(kind)
        threshold = self.thresholds[layer] if kind == Kind.SPARSE and self.thresholds is not None else None
        if layer in self.packed:
            return self.packed[layer].weights(rows, threshold)
        if self.quant is not None:  # dequantized tile by tile as the math reads it
            w = self._quant_views(layer, rows, slot)
        elif layer in self.resident:
            w = lay.views(self.resident[layer], rows=rows)
        elif layer in self.prefix_buffers:
            w = lay.views(self.prefix_buffers[layer], rows=k)
            if rows == n and k < n:  # the complement arrives in the slot, from offset 0
                comp = self.slots.buffers[slot][:(n - k) * lay.row_numel].view(n - k, 3, lay.hidden_size)
                w = replace(w, mlp=w.mlp + (comp,))
        else:
            w = lay.views(self.slots.buffers[slot], rows=rows)
        return replace(w, mlp_threshold=threshold) if threshold is not None else w

    def _quant_source(self, layer: int, slot: int | None) -> torch.Tensor:
        """The bytes holding a quantized layer's attention part (and its first neurons)."""
        if layer in self.prefix_buffers:
            return self.prefix_buffers[layer]
        return self.resident[layer] if layer in self.resident else self.slots.buffers[slot]

    def _quant_views(self, layer: int, rows: int, slot: int | None) -> LayerWeights:
        src, k = self._quant_source(layer, slot), self.rows
        vectors = self.own_vectors.get(layer, self.vectors)
        if layer in self.prefix_buffers and rows > k:  # the complement rows arrived in the slot
            return quant_views(self.quant, src, vectors, k, self.work, self.dequant_backend,
                               complement=self.slots.buffers[slot])
        return quant_views(self.quant, src, vectors, rows, self.work, self.dequant_backend)

    # --- selection (the caller drains in-flight copies first) ----------------------------------
    def reorder_neurons(self, orders: Sequence[torch.Tensor], rows: int) -> None:
        """Put each layer's selected neurons first (orders[i] is a permutation of the neurons)
        and make SPARSE passes use the first `rows` of them; selected prefixes of the
        prefix-resident layers are (re)loaded onto the device. Only the rows an order moves are
        copied, on the host and to the device."""
        self._forget_views()  # before replacing packed layers: cached views would keep the old ones alive
        moved = [moved_rows(order) for order in orders]
        most = max((places.numel() for layer, places in enumerate(moved) if layer not in self.packed), default=0)
        same_prefix = rows == self.rows and self.thresholds is None  # device prefixes keep their size
        staging, used_slots = None, set()
        for layer, (order, places) in enumerate(zip(orders, moved)):
            if not places.numel():
                continue
            if layer in self.packed:
                self.packed[layer] = self.packed[layer].reordered(order.to(self.device), places.to(self.device))
                self.epoch += 1
                continue
            flat = self.resident.get(layer, self.host.get(layer))
            bundle = flat[self.fmt.mlp_offset:].view(self.fmt.intermediate_size, -1)
            if staging is None or staging.device != bundle.device:
                staging, staging_slot = self._scratch(bundle, most)
                used_slots.add(staging_slot)
            held = staging[:places.numel()]
            # in place, moved rows only: captured step graphs (step_graphs.py) stay valid
            gather_rows(bundle, order[places].to(bundle.device), held)
            scatter_rows(held, places.to(bundle.device), bundle)
            if same_prefix and layer in self.prefix_buffers:
                used_slots.add(self._update_prefix(layer, places, held, busy={staging_slot}))
        for slot in used_slots - {None}:  # the next copy into a slot waits for the work queued on it
            self.slots.free(slot)
        n = self.layout.intermediate_size
        if rows != self.rows or self.thresholds is not None or rows == n:
            self.epoch += 1  # SPARSE passes read other rows (all selected: no prefix at all)
        if rows == n:  # nothing is selected out: no prefix worth keeping
            self.prefix_buffers.clear()
        self.rows, self.thresholds = rows, None
        for layer in self.prefix_layers if rows < n else ():
            self._new_prefix(layer)
        self._forget_views()

    def _update_prefix(self, layer: int, places: torch.Tensor, held: torch.Tensor, busy: set) -> int | None:
        """A device prefix follows its host layer's reorder: the records that moved inside it
        (their new contents: the first rows of `held`, as `places` ascend) go over the link into
        room on the device (not in the `busy` slot holding `held`) and are scattered to their
        places. Returns the slot that room was in."""
        inside = int((places < self.rows).sum())
        if not inside:
            return None
        mlp = self.prefix_buffers[layer][self.fmt.mlp_offset:].view(self.rows, -1)
        room, slot = self._scratch(mlp, inside, busy)
        # after the compute queued so far: it may still read the room (a slot) or these records
        ticket = self.link.copy(room, held[:inside], after=self.link.compute_done())
        self.link.wait(ticket)
        scatter_rows(room, places[:inside].to(mlp.device), mlp)
        self.link.finish(ticket)  # the host staging is rewritten for the next layer
        return slot

    def _new_prefix(self, layer: int) -> None:
        """A device prefix for the selected rows, copied whole, where there is none of their size."""
        size, buffer = self.fmt.prefix_numel(self.rows), self.prefix_buffers.get(layer)
        if buffer is not None and buffer.numel() == size:
            return
        buffer = self.prefix_buffers[layer] = torch.empty(size, dtype=self.fmt_dtype, device=self.device)
        self.epoch += 1
        # after the compute queued so far: a new buffer may reuse memory it still reads
        self.link.wait(self.link.copy(buffer, self.host[layer][:size], after=self.link.compute_done()))

    def _scratch(self, like: torch.Tensor, rows: int, busy: set = frozenset()) -> tuple[torch.Tensor, int | None]:
        """Room for `rows` rows of `like`, and the slot it is in: a streaming slot not in `busy`
        where one is on its device (idle now: the caller drained the copies, and compute still
        reading it runs first on the same stream), so a device full of resident layers needs no
        more memory; else a new buffer (slot None)."""
        shape = (rows,) + tuple(like.shape[1:])
        numel = rows * like[0].numel()
        for slot, buf in enumerate(self.slots.buffers if self.slots is not None else ()):
            if slot not in busy and buf.device == like.device and buf.dtype == like.dtype and buf.numel() >= numel:
                return buf[:numel].view(shape), slot
        return torch.empty(shape, dtype=like.dtype, device=like.device), None

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """CATS: SPARSE passes use every neuron, skipping those under the layer's threshold."""
        self.prefix_buffers.clear()  # every row may be needed: no prefix is enough
        self.rows, self.thresholds = self.layout.intermediate_size, list(thresholds)
        self.epoch += 1
        self._forget_views()

    def _forget_views(self) -> None:
        self._views.clear()
        self._jobs.clear()

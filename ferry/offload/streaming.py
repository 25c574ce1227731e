"""The layer executor: resident weights, a fixed pool of device slots, and the prefetch queue.

Every forward pass is one of two kinds: FULL (all MLP neurons: prefill, dense steps, the
correction pass) or SPARSE (only the selected neurons). After Griffin reorders each layer's
neurons, the selected ones form a prefix of the layer's flat buffer, so per layer and kind the
bytes to move are one contiguous range of the host buffer:

- whole layer resident: nothing moves;
- prefix resident (attention + selected rows on the device): SPARSE moves nothing, FULL moves
  the complement rows;
- streamed: SPARSE moves the prefix, FULL the whole layer.

Fetches form a queue in the order they will be used, across layers, passes and tokens. Item n
goes to slot n % depth; when item n is released, item n + depth is issued into the slot it just
freed, so prefetch is `depth` items deep and the first layers of the next pass load while the
last ones of this pass compute. The kinds of future passes come from `expect` (the decode loop
knows its schedule) or repeat the last kind; a wrong guess is corrected at `begin_pass` (the
guessed copies are wasted, never used). The serial schedule fetches each layer when needed and
waits for it: the correctness oracle.

Quantized weights (`quant`): host buffers, slots, resident layers and resident prefixes hold the
bytes of `QuantLayout` (ranges above are then byte ranges); when a layer is acquired, the part the
pass uses is dequantized into one work buffer laid out like an unquantized layer, whose views the
model math reads. Resident data stays quantized, which is what lets a large selected set fit.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ferry.kernels.gather import gather_rows
from ferry.model.quant import QuantLayout, dequantize_jobs, record_jobs
from ferry.model.weights import LayerLayout, LayerWeights

FULL, SPARSE = "full", "sparse"


@dataclass(frozen=True)
class Item:
    pass_no: int
    layer: int
    kind: str


class LayerExecutor:
    def __init__(
        self, layout: LayerLayout, resident: dict[int, torch.Tensor], host: dict[int, torch.Tensor],
        depth: int, link, device: torch.device, dtype: torch.dtype, pipelined: bool = True,
        prefix_layers: Sequence[int] = (), quant: QuantLayout | None = None, dequant_backend: str = "torch",
    ):
        self.layout, self.resident, self.host, self.link = layout, resident, host, link
        self.quant, self.dequant_backend = quant, dequant_backend
        self.store = quant or layout  # how the host, slot and resident buffers are laid out
        self.store_dtype = torch.uint8 if quant else dtype
        self.work = torch.empty(layout.numel, dtype=dtype, device=device) if quant else None
        self.device, self.dtype, self.pipelined = device, dtype, pipelined
        self.order = tuple(sorted(host))  # streamed layers in visiting order
        self.prefix_layers = tuple(prefix_layers)  # streamed layers whose selected prefix stays
        self.prefix_buffers: dict[int, torch.Tensor] = {}
        self.depth = min(depth, len(self.order)) if self.order else 0
        self.slots = [torch.empty(self.store.numel, dtype=self.store_dtype, device=device)
                      for _ in range(self.depth)]
        self.tickets: list = [None] * self.depth
        self.freed: list = [None] * self.depth  # compute-done markers guarding slot reuse
        self.rows = layout.intermediate_size  # neurons a SPARSE pass uses (a prefix)
        self.thresholds: list[float] | None = None  # CATS thresholds for SPARSE passes
        self._views: dict[tuple, LayerWeights] = {}
        self._jobs: dict[tuple, list] = {}  # dequantization steps per (layer, kind, slot)
        self.queue: deque[Item] = deque()  # unconsumed fetches in use order
        self.head = 0  # number of queue[0]; its slot is head % depth
        self.in_flight = 0  # the first in_flight items of the queue have been issued
        self.pass_no, self.kind = 0, FULL
        self.predicted: dict[int, str] = {}  # expected kind of future passes, by pass number
        self.default_kind = FULL  # assumed for passes beyond the predictions
        self.trace: list[tuple] | None = None  # when a list: every fetch and compute, in order

    # --- what a (layer, kind) needs -------------------------------------------------------
    def fetch_range(self, layer: int, kind: str) -> tuple[int, int] | None:
        """The element range of the layer's host buffer a pass of this kind must move."""
        if layer in self.resident:
            return None
        prefix = self.store.prefix_numel(self.rows)
        if layer in self.prefix_buffers:
            return None if kind == SPARSE or self.rows == self.store.intermediate_size else (prefix, self.store.numel)
        return (0, prefix) if kind == SPARSE and self.thresholds is None else (0, self.store.numel)

    def moves_nothing(self, kind: str) -> bool:
        """Whether a pass of this kind runs on device-resident weights alone."""
        return all(self.fetch_range(layer, kind) is None for layer in self.order)

    def weights(self, layer: int, kind: str, slot: int | None) -> LayerWeights:
        key = (layer, kind, slot)
        if key not in self._views:
            self._views[key] = self._build_views(layer, kind, slot)
        return self._views[key]

    def _build_views(self, layer: int, kind: str, slot: int | None) -> LayerWeights:
        n, k, lay = self.layout.intermediate_size, self.rows, self.layout
        sparse_rows = k if kind == SPARSE and self.thresholds is None else n
        threshold = self.thresholds[layer] if kind == SPARSE and self.thresholds is not None else None
        if self.quant is not None:  # dequantized into the work buffer: always one bundle
            w = lay.views(self.work, rows=sparse_rows)
        elif layer in self.resident:
            w = lay.views(self.resident[layer], rows=sparse_rows)
        elif layer in self.prefix_buffers:
            w = lay.views(self.prefix_buffers[layer], rows=k)
            if sparse_rows == n and k < n:  # the complement arrives in the slot, from offset 0
                comp = self.slots[slot][:(n - k) * lay.row_numel].view(n - k, 3, lay.hidden_size)
                w = replace(w, mlp=w.mlp + (comp,))
        else:
            w = lay.views(self.slots[slot], rows=sparse_rows)
        return replace(w, mlp_threshold=threshold) if threshold is not None else w

    # --- the pass protocol ------------------------------------------------------------------
    def begin_pass(self, kind: str) -> None:
        self.pass_no += 1
        self.kind = kind
        self.predicted.pop(self.pass_no, None)
        if not self.predicted:
            self.default_kind = kind
        if not self.pipelined:
            return
        while self.queue and self.queue[0].pass_no < self.pass_no:  # left over from a cut pass
            self._drop_front()
        head_pass = self.queue[0] if self.queue else None
        needs = any(self.fetch_range(i, kind) for i in self.order)
        wrong = head_pass is not None and head_pass.pass_no == self.pass_no and head_pass.kind != kind
        missing = needs and (head_pass is None or head_pass.pass_no != self.pass_no)
        if wrong or missing:
            self._drop_from(self.pass_no)
            self._queue_pass(self.pass_no, kind)
        self._issue()

    def expect(self, kinds: Sequence[str]) -> None:
        """Kinds of the passes after the current one, so prefetch loads the right bytes."""
        self.predicted = {self.pass_no + j: kind for j, kind in enumerate(kinds, start=1)}
        self.default_kind = kinds[-1] if kinds else self.kind
        if not self.pipelined:
            return
        for offset, kind in enumerate(kinds, start=1):
            p = self.pass_no + offset
            if any(it.pass_no == p and it.kind != kind for it in self.queue):
                self._drop_from(p)
                break
        self._issue()

    def acquire(self, layer: int) -> LayerWeights:
        span = self.fetch_range(layer, self.kind)
        if span is None:
            if self.trace is not None:
                self.trace.append(("compute", self.kind, layer, None))
            self._dequantize(layer, None)
            return self.weights(layer, self.kind, None)
        if not self.pipelined:
            slot = self.head % self.depth
            self._copy(slot, layer, span)
        else:
            item = self.queue[0] if self.queue else None
            if item != Item(self.pass_no, layer, self.kind) or self.in_flight == 0:
                self._drop_from(0)  # out of step (a pass cut short): start over from here
                self._queue_pass(self.pass_no, self.kind, first_layer=layer)
                self._issue()
            slot = self.head % self.depth
        self.link.wait(self.tickets[slot])
        if self.trace is not None:
            self.trace.append(("compute", self.kind, layer, slot))
        self._dequantize(layer, slot)
        return self.weights(layer, self.kind, slot)

    def _dequantize(self, layer: int, slot: int | None, kind: str | None = None) -> None:
        """Quantized weights: what this pass uses of the layer into the work buffer."""
        if self.quant is None:
            return
        kind = kind or self.kind
        key = (layer, kind, slot)
        if key not in self._jobs:
            self._jobs[key] = self._dequantize_jobs(layer, kind, slot)
        for job in self._jobs[key]:
            job()

    def _dequantize_jobs(self, layer: int, kind: str, slot: int | None) -> list:
        q, n, k, backend = self.quant, self.layout.intermediate_size, self.rows, self.dequant_backend
        rows = k if kind == SPARSE and self.thresholds is None else n
        if layer in self.prefix_buffers:
            jobs = dequantize_jobs(q, self.prefix_buffers[layer], self.work, k, backend)
            if rows > k:  # the complement rows arrived at the start of the slot
                jobs += record_jobs(q, self.slots[slot], self.layout.bundle(self.work, k, n), backend)
            return jobs
        src = self.resident[layer] if layer in self.resident else self.slots[slot]
        return dequantize_jobs(q, src, self.work, rows, backend)

    def release(self, layer: int) -> None:
        if self.fetch_range(layer, self.kind) is None:
            return
        slot = self.head % self.depth
        self.freed[slot] = self.link.compute_done()
        self.head += 1
        if self.pipelined:
            self.queue.popleft()
            self.in_flight -= 1
            self._issue()

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """Small host tensors (embedding rows): copied now, beside the prefetch queue, and counted."""
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.link.copy_now(out, host)
        return out

    # --- the queue ----------------------------------------------------------------------------
    def _queue_pass(self, pass_no: int, kind: str, first_layer: int = -1) -> None:
        for layer in self.order:
            if layer >= first_layer and self.fetch_range(layer, kind):
                self.queue.append(Item(pass_no, layer, kind))

    def _extend(self) -> bool:
        """Queue the next predicted pass; False when that adds nothing."""
        last = self.queue[-1].pass_no if self.queue else self.pass_no
        horizon = max([last, *self.predicted]) + 1
        for p in range(last + 1, horizon + 1):
            kind = self.predicted.get(p, self.default_kind)
            before = len(self.queue)
            self._queue_pass(p, kind)
            if len(self.queue) > before:
                return True
        return False

    def _issue(self) -> None:
        while self.depth and self.in_flight < self.depth:
            if self.in_flight >= len(self.queue) and not self._extend():
                return
            item = self.queue[self.in_flight]
            self._copy((self.head + self.in_flight) % self.depth, item.layer,
                       self.fetch_range(item.layer, item.kind), item.kind)
            self.in_flight += 1

    def _copy(self, slot: int, layer: int, span: tuple[int, int], kind: str | None = None) -> None:
        lo, hi = span
        if self.trace is not None:
            self.trace.append(("fetch", kind or self.kind, layer, slot, lo, hi))
        self.tickets[slot] = self.link.copy(self.slots[slot][:hi - lo], self.host[layer][lo:hi],
                                            after=self.freed[slot], tag=layer)

    def _drop_from(self, pass_no: int) -> None:
        """Forget queued items of pass_no and later; issued ones are wasted (their slots reused)."""
        while self.queue and self.queue[-1].pass_no >= pass_no:
            self.queue.pop()
        self.in_flight = min(self.in_flight, len(self.queue))

    def _drop_front(self) -> None:
        self.queue.popleft()
        self.head += 1
        self.in_flight = max(0, self.in_flight - 1)

    # --- selection ------------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait (on the host) for every issued copy and forget the queue, so host buffers can
        change."""
        for ticket in self.tickets:
            self.link.finish(ticket)
        self.queue.clear()
        self.in_flight = 0

    def reorder_neurons(self, orders: Sequence[torch.Tensor], rows: int) -> None:
        """Put each layer's selected neurons first (orders[i] is a permutation of the neurons)
        and make SPARSE passes use the first `rows` of them; selected prefixes of the
        prefix-resident layers are (re)loaded onto the device."""
        self.drain()
        staging = None
        for layer, order in enumerate(orders):
            flat = self.resident.get(layer, self.host.get(layer))
            bundle = flat[self.store.mlp_offset:].view(self.store.intermediate_size, -1)
            if staging is None or staging.device != bundle.device:
                staging = torch.empty_like(bundle)
            gather_rows(bundle, order.to(bundle.device), staging)
            bundle.copy_(staging)
        self.rows, self.thresholds = rows, None
        prefix = self.store.prefix_numel(rows)
        if rows == self.layout.intermediate_size:
            self.prefix_buffers.clear()
        for layer in self.prefix_layers if rows < self.layout.intermediate_size else ():
            if layer not in self.prefix_buffers:
                self.prefix_buffers[layer] = torch.empty(prefix, dtype=self.store_dtype, device=self.device)
            self.link.wait(self.link.copy(self.prefix_buffers[layer], self.host[layer][:prefix]))
        self._views.clear()
        self._jobs.clear()

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """CATS: SPARSE passes use every neuron, skipping those under the layer's threshold."""
        self.drain()
        self.prefix_buffers.clear()
        self.rows, self.thresholds = self.layout.intermediate_size, list(thresholds)
        self._views.clear()
        self._jobs.clear()


class PassView:
    """The executor seen by one forward pass of a given kind (what `forward` calls).

    A resident view runs on weights already on the device (the resident sparse set) and takes
    no part in the fetch queue, so it can run between the layers of a streaming full pass
    without disturbing that pass's prefetch (speculative sparse steps).
    """

    def __init__(self, executor: LayerExecutor, kind: str, resident: bool = False):
        self.executor, self.kind, self.resident = executor, kind, resident

    def as_resident(self) -> "PassView":
        if not self.executor.moves_nothing(self.kind):
            raise RuntimeError(f"a {self.kind} pass needs streamed weights; it cannot bypass the queue")
        view = copy.copy(self)
        view.resident = True
        return view

    def begin(self) -> None:
        if not self.resident:
            self.executor.begin_pass(self.kind)

    def acquire(self, index: int) -> LayerWeights:
        if not self.resident:
            return self.executor.acquire(index)
        if self.executor.trace is not None:
            self.executor.trace.append(("compute", self.kind, index, None))
        self.executor._dequantize(index, None, self.kind)
        return self.executor.weights(index, self.kind, None)

    def release(self, index: int) -> None:
        if not self.resident:
            self.executor.release(index)

    def end(self) -> None:
        """The pass's last work is queued (a hook for ferry.profiler's timed view)."""

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return self.executor.upload(host)

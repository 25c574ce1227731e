"""The layer executor: hands each forward pass its layers' weights, streaming what is not resident.

Three parts, each in its own module, read in this order:

- `ferry/offload/layer_store.py`: where each layer lives (resident, prefix-resident, streamed),
  which range of it a pass of each kind must move, and the weight views the model math reads
  (dequantizing quantized layers first);
- `ferry/offload/slots.py`: the fixed pool of device slots streamed layers are copied into, and
  the tickets and markers that order copies and compute around each slot;
- `ferry/offload/prefetch.py`: the queue of fetches in use order, which slot each goes to, and
  how far ahead copies are issued.

`LayerExecutor` composes them behind the pass protocol the engine drives: `begin_pass(kind)`,
then per layer `acquire` (wait for the layer's bytes, return its weights) and `release` (its
compute is queued, so its slot may be refilled), with `expect` announcing the kinds of the
passes to come. `drain` waits for every copy so that `reorder_neurons` and `set_thresholds` may
rewrite host buffers. `PassView` is the executor seen by one forward pass of one kind: what the
model's `forward` calls.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ferry.model.quant import QuantLayout
from ferry.model.weights import Kind, LayerLayout, LayerWeights
from ferry.offload.layer_store import LayerStore, stored_as
from ferry.offload.prefetch import Prefetcher
from ferry.offload.slots import SlotPool
from ferry.offload.transfer import Link


class LayerExecutor:
    def __init__(
        self, layout: LayerLayout, resident: dict[int, torch.Tensor], host: dict[int, torch.Tensor],
        depth: int, link: Link, device: torch.device, dtype: torch.dtype, pipelined: bool = True,
        prefix_layers: Sequence[int] = (), quant: QuantLayout | None = None, dequant_backend: str = "torch",
    ):
        self.link, self.device = link, device
        fmt, fmt_dtype = stored_as(layout, quant, dtype)
        self.depth = min(depth, len(host))  # no more slots than streamed layers (none without)
        self.slots = SlotPool(self.depth, fmt.numel, fmt_dtype, device, link)
        self.store = LayerStore(layout, resident, host, self.slots, link, device, dtype,
                                prefix_layers, quant, dequant_backend)
        self.prefetch = Prefetcher(self.store, self.slots, pipelined)

    @property
    def trace(self) -> list[tuple] | None:
        """When set to a list, every fetch ("fetch", kind, layer, slot, lo, hi) and compute
        ("compute", kind, layer, slot) is appended to it, in order (tests compare it with
        `ferry.scheduler.schedule.chunk_schedule`)."""
        return self.prefetch.trace

    @trace.setter
    def trace(self, value: list[tuple] | None) -> None:
        self.prefetch.trace = value

    def moves_nothing(self, kind: Kind) -> bool:
        """Whether a pass of this kind runs on device-resident weights alone."""
        return self.store.moves_nothing(Kind(kind))

    # --- the pass protocol ------------------------------------------------------------------
    def begin_pass(self, kind: Kind) -> None:
        self.prefetch.begin_pass(Kind(kind))

    def expect(self, kinds: Sequence[Kind]) -> None:
        """Kinds of the passes after the current one, so prefetch loads the right bytes."""
        self.prefetch.expect([Kind(k) for k in kinds])

    def acquire(self, layer: int) -> LayerWeights:
        """The layer's weights for the current pass, once its bytes are on the device."""
        kind = self.prefetch.kind
        if self.store.fetch_range(layer, kind) is None:
            return self.acquire_resident(layer, kind)
        slot = self.prefetch.slot_for(layer)
        self.slots.wait(slot)
        self._record(kind, layer, slot)
        return self.store.ready(layer, kind, slot)

    def acquire_resident(self, layer: int, kind: Kind) -> LayerWeights:
        """A layer whose weights for this kind are all on the device: no slot, no queue, so a
        resident pass may run between the layers of a streaming one."""
        self._record(kind, layer, None)
        return self.store.ready(layer, kind, None)

    def release(self, layer: int) -> None:
        if self.store.fetch_range(layer, self.prefetch.kind) is not None:
            self.prefetch.release()

    def upload(self, host: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Small host tensors (embedding rows): copied now, beside the prefetch queue, and counted
        (into `out` when given: a captured step's input buffer)."""
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device) if out is None else out
        self.link.copy_now(out, host)
        return out

    def drain(self) -> None:
        """Wait (on the host) for every issued copy and forget the queue, so host buffers can
        change."""
        self.slots.drain()
        self.prefetch.clear()

    def _record(self, kind: Kind, layer: int, slot: int | None) -> None:
        if self.trace is not None:
            self.trace.append(("compute", kind, layer, slot))

    # --- selection ------------------------------------------------------------------------------
    def reorder_neurons(self, orders: Sequence[torch.Tensor], rows: int) -> None:
        """Put each layer's selected neurons first (orders[i] is a permutation of the neurons)
        and make SPARSE passes use the first `rows` of them."""
        self.drain()
        self.store.reorder_neurons(orders, rows)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """CATS: SPARSE passes use every neuron, skipping those under the layer's threshold."""
        self.drain()
        self.store.set_thresholds(thresholds)


class PassView:
    """The executor seen by one forward pass of a given kind (what `forward` calls).

    A resident view runs on weights already on the device (the resident sparse set) and takes
    no part in the fetch queue, so it can run between the layers of a streaming full pass
    without disturbing that pass's prefetch (speculative sparse steps).
    """

    def __init__(self, executor: LayerExecutor, kind: Kind, resident: bool = False):
        self.executor, self.kind, self.resident = executor, Kind(kind), resident

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
        if self.resident:
            return self.executor.acquire_resident(index, self.kind)
        return self.executor.acquire(index)

    def release(self, index: int) -> None:
        if not self.resident:
            self.executor.release(index)

    def end(self) -> None:
        """The pass's last work is queued (a hook for ferry.profile's timed view)."""

    def upload(self, host: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.executor.upload(host, out)

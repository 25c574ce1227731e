"""The prefetch queue: which (pass, layer, kind) fetch goes into which slot, and when.

Fetches form a queue in the order they will be used, across layers, passes and tokens. Item n
goes to slot n % depth; when item n is released, item n + depth is issued into the slot it just
freed, so prefetch is `depth` items deep and the first layers of the next pass load while the
last ones of this pass compute. Only (layer, kind) pairs that move bytes are queued: resident
layers, and prefix-resident ones in a SPARSE pass, take no part.

The kinds of future passes come from `expect` (the decode loop knows its schedule) or repeat the
last kind. A wrong guess is corrected at `begin_pass` or `expect`: the guessed items are dropped
and the right ones queued; copies already issued for them are wasted, never used, and their
slots simply refilled. A pass cut short (an early stop) leaves items behind; they are dropped
when the next pass begins, and a layer acquired out of step restarts the queue from that layer.

The serial schedule (`pipelined=False`) queues nothing: each layer is copied when acquired and
waited for, one slot after another. It is the correctness oracle for the pipelined one.

This module is bookkeeping only: the layer store says which range a (layer, kind) moves, the
slot pool does the copies and guards the slots. `ferry/scheduler/schedule.py` states the same
order independently, as data; tests compare the two.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from ferry.model.weights import Kind
from ferry.offload.layer_store import LayerStore
from ferry.offload.slots import SlotPool


@dataclass(frozen=True)
class Item:
    """One fetch: the bytes `layer` needs in pass number `pass_no`, a pass of `kind`."""

    pass_no: int
    layer: int
    kind: Kind


class Prefetcher:
    def __init__(self, store: LayerStore, slots: SlotPool, pipelined: bool = True):
        self.store, self.slots, self.pipelined = store, slots, pipelined
        self.depth = len(slots)
        self.queue: deque[Item] = deque()  # unconsumed fetches in use order
        self.head = 0  # number of queue[0]; its slot is head % depth
        self.in_flight = 0  # the first in_flight items of the queue have been issued
        self.pass_no, self.kind = 0, Kind.FULL  # the pass running now
        self.predicted: dict[int, Kind] = {}  # expected kind of future passes, by pass number
        self.default_kind = Kind.FULL  # assumed for passes beyond the predictions
        self.trace: list[tuple] | None = None  # when a list: ("fetch", kind, layer, slot, lo, hi) per copy

    # --- passes ---------------------------------------------------------------------------------
    def begin_pass(self, kind: Kind) -> None:
        self.pass_no += 1
        self.kind = kind
        self.predicted.pop(self.pass_no, None)
        if not self.predicted:
            self.default_kind = kind
        if not self.pipelined:
            return
        while self.queue and self.queue[0].pass_no < self.pass_no:  # left over from a cut pass
            self._drop_front()
        head = self.queue[0] if self.queue else None
        wrong = head is not None and head.pass_no == self.pass_no and head.kind != kind
        missing = (not self.store.moves_nothing(kind)) and (head is None or head.pass_no != self.pass_no)
        if wrong or missing:
            self._drop_from(self.pass_no)
            self._queue_pass(self.pass_no, kind)
        self._issue()

    def expect(self, kinds: Sequence[Kind]) -> None:
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

    # --- layers of the current pass -----------------------------------------------------------
    def slot_for(self, layer: int) -> int:
        """The slot that holds (or is filling with) this streamed layer's bytes for this pass."""
        if not self.pipelined:
            self._copy(self.head % self.depth, Item(self.pass_no, layer, self.kind))
        else:
            item = self.queue[0] if self.queue else None
            if item != Item(self.pass_no, layer, self.kind) or self.in_flight == 0:
                self._drop_from(0)  # out of step (a pass cut short): start over from here
                self._queue_pass(self.pass_no, self.kind, first_layer=layer)
                self._issue()
        return self.head % self.depth

    def release(self) -> None:
        """The current streamed layer's compute is queued: its slot may take the next fetch."""
        self.slots.free(self.head % self.depth)
        self.head += 1
        if self.pipelined:
            self.queue.popleft()
            self.in_flight -= 1
            self._issue()

    def clear(self) -> None:
        """Forget the queue (after the slot pool drained: nothing issued is pending)."""
        self.queue.clear()
        self.in_flight = 0

    # --- the queue ----------------------------------------------------------------------------
    def _queue_pass(self, pass_no: int, kind: Kind, first_layer: int = -1) -> None:
        for layer in self.store.order:
            if layer >= first_layer and self.store.fetch_range(layer, kind):
                self.queue.append(Item(pass_no, layer, kind))

    def _extend(self) -> bool:
        """Queue the next predicted pass; False when that adds nothing."""
        last = self.queue[-1].pass_no if self.queue else self.pass_no
        horizon = max([last, *self.predicted]) + 1
        for p in range(last + 1, horizon + 1):
            before = len(self.queue)
            self._queue_pass(p, self.predicted.get(p, self.default_kind))
            if len(self.queue) > before:
                return True
        return False

    def _issue(self) -> None:
        """Issue queued items until `depth` are in flight (queueing predicted passes as needed)."""
        while self.depth and self.in_flight < self.depth:
            if self.in_flight >= len(self.queue) and not self._extend():
                return
            self._copy((self.head + self.in_flight) % self.depth, self.queue[self.in_flight])
            self.in_flight += 1

    def _copy(self, slot: int, item: Item) -> None:
        lo, hi = self.store.fetch_range(item.layer, item.kind)
        if self.trace is not None:
            self.trace.append(("fetch", item.kind, item.layer, slot, lo, hi))
        self.slots.copy(slot, self.store.host[item.layer][lo:hi], tag=item.layer)

    def _drop_from(self, pass_no: int) -> None:
        """Forget queued items of pass_no and later; issued ones are wasted (their slots reused)."""
        while self.queue and self.queue[-1].pass_no >= pass_no:
            self.queue.pop()
        self.in_flight = min(self.in_flight, len(self.queue))

    def _drop_front(self) -> None:
        self.queue.popleft()
        self.head += 1
        self.in_flight = max(0, self.in_flight - 1)

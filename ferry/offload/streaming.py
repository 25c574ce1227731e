"""Streamed layers: a fixed pool of device slots refilled from the host store over a Link.

Every forward pass visits layers 0..L-1 in order, so the streamed layers are used in a fixed
cycle. Use number n (counted across passes and tokens) runs from slot n % depth; right after
use n is released, the copy for use n + depth is issued into the slot it just freed. Prefetch
is therefore `depth` layers deep and crosses token boundaries on its own: while the last layers
of one step compute, the first streamed layers of the next are already on their way.

The serial schedule (the oracle) fetches each layer when it is needed and waits for it.
"""

from __future__ import annotations

import torch

from ferry.model.weights import LayerLayout, LayerWeights


class StreamedLayers:
    def __init__(
        self, layout: LayerLayout, resident: dict[int, LayerWeights], host: dict[int, torch.Tensor],
        depth: int, link, device: torch.device, dtype: torch.dtype, pipelined: bool = True,
    ):
        self.resident, self.host, self.link, self.pipelined = resident, host, link, pipelined
        self.order = tuple(sorted(host))  # streamed layers in visiting order
        self.position = {layer: j for j, layer in enumerate(self.order)}
        self.depth = min(depth, len(self.order)) if self.order else 0
        self.slots = [torch.empty(layout.numel, dtype=dtype, device=device) for _ in range(self.depth)]
        self.views = [layout.views(slot) for slot in self.slots]  # built once, reused forever
        self.device = device
        self.tickets: list = [None] * self.depth
        self.freed: list = [None] * self.depth  # compute-done markers guarding slot reuse
        self.slot_layer = [-1] * self.depth
        self.used = 0  # number of streamed-layer uses so far
        if self.pipelined and self.order:
            self._restart(0)

    def _fetch(self, use: int) -> None:
        """Issue the copy for use number `use` into its slot."""
        slot, layer = use % self.depth, self.order[use % len(self.order)]
        self.tickets[slot] = self.link.copy(self.slots[slot], self.host[layer], after=self.freed[slot])
        self.slot_layer[slot] = layer

    def _restart(self, position: int) -> None:
        """Align the cycle so the next use is `position` and prefetch `depth` uses ahead."""
        for ticket in self.tickets:
            self.link.wait(ticket)
        self.used = position
        for use in range(position, position + self.depth):
            self._fetch(use)

    def acquire(self, index: int) -> LayerWeights:
        if index in self.resident:
            return self.resident[index]
        position = self.position[index]
        slot = self.used % self.depth
        if not self.pipelined:
            self._fetch(self.used)
        elif self.used % len(self.order) != position or self.slot_layer[slot] != index:
            self._restart(position)  # a pass was cut short (an exception): resynchronise
            slot = self.used % self.depth
        self.link.wait(self.tickets[slot])
        return self.views[slot]

    def release(self, index: int) -> None:
        if index in self.resident:
            return
        slot = self.used % self.depth
        self.freed[slot] = self.link.compute_done()
        if self.pipelined:
            self._fetch(self.used + self.depth)
        else:
            self.slot_layer[slot] = -1
        self.used += 1

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """Small host tensors (embedding rows): copied now, counted, and waited for."""
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.link.wait(self.link.copy(out, host))
        return out

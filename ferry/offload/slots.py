"""The device slots streamed layers pass through: a fixed pool, allocated once.

A streamed layer is copied into a slot, computed on, and the slot is then reused for a later
layer. Two orders must hold, and each slot keeps what enforces them:

- compute reads a slot only after the copy into it is done: the copy's *ticket*;
- a copy overwrites a slot only after the compute reading its previous contents is done: the
  slot's *compute-done marker*, recorded when that compute releases the slot.

On a GPU both are events, so the copy stream and the compute stream order themselves without the
host blocking; on the CPU links they are None or a thread event. Which slot a layer goes to is
the prefetcher's business (`ferry/offload/prefetch.py`); the pool only keeps the buffers and the
two orders.
"""

from __future__ import annotations

import torch

from ferry.offload.transfer import Link, Marker, Ticket


class SlotPool:
    """`count` device buffers of `numel` elements each, with a ticket and a marker per slot."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device, link: Link):
        self.link = link
        # Preallocated: fresh buffers in the decode loop would page-fault on every token.
        self.buffers = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]
        self._tickets: list[Ticket] = [None] * count  # the last copy into each slot
        self._freed: list[Marker] = [None] * count  # compute-done markers guarding slot reuse

    def __len__(self) -> int:
        return len(self.buffers)

    def copy(self, slot: int, src: torch.Tensor, tag: int | None = None) -> None:
        """Copy src (a host range) into the start of the slot, after the slot's last compute."""
        dst = self.buffers[slot][:src.numel()]
        self._tickets[slot] = self.link.copy(dst, src, after=self._freed[slot], tag=tag)

    def wait(self, slot: int) -> None:
        """Make compute wait until the slot's copy has landed."""
        self.link.wait(self._tickets[slot])

    def free(self, slot: int) -> None:
        """The compute reading the slot is queued: the next copy into it must follow that."""
        self._freed[slot] = self.link.compute_done()

    def drain(self) -> None:
        """Block the host until every copy issued is done, so host buffers may be rewritten."""
        for ticket in self._tickets:
            self.link.finish(ticket)

"""The parts of the layer executor on their own: the fetch rule, the Link protocol, the slot pool."""

from __future__ import annotations

import pytest
import torch

from ferry.model.weights import Kind
from ferry.offload.layer_store import Where, fetch_span
from ferry.offload.slots import SlotPool
from ferry.offload.cpu_links import EmulatedLink, InOrderLink
from ferry.offload.transfer import CudaLink, Link

FULL, SPARSE = Kind.FULL, Kind.SPARSE


@pytest.mark.parametrize("where, kind, per_token, want", [
    (Where.RESIDENT, FULL, False, None),
    (Where.RESIDENT, SPARSE, False, None),
    (Where.PREFIX, SPARSE, False, None),  # the selected rows are on the device
    (Where.PREFIX, FULL, False, (30, 100)),  # the complement of the prefix
    (Where.STREAMED, SPARSE, False, (0, 30)),  # the selected prefix
    (Where.STREAMED, SPARSE, True, (0, 100)),  # CATS chooses per token: every row
    (Where.STREAMED, FULL, False, (0, 100)),
])
def test_fetch_span_is_one_contiguous_range(where, kind, per_token, want):
    assert fetch_span(where, kind, prefix=30, whole=100, per_token=per_token) == want


def test_a_prefix_as_large_as_the_layer_moves_nothing_more():
    assert fetch_span(Where.PREFIX, FULL, prefix=100, whole=100, per_token=False) is None


def test_every_link_has_the_protocol_methods():
    members = [name for name in vars(Link) if not name.startswith("_")]
    assert {"copy", "copy_now", "wait", "finish", "compute_done", "stats", "close"} <= set(members)
    for cls in (InOrderLink, EmulatedLink, CudaLink):
        assert all(callable(getattr(cls, name, None)) for name in members), cls


def test_slot_pool_copies_into_the_start_of_a_slot_and_counts_it():
    link = EmulatedLink(50.0)
    pool = SlotPool(2, 8, torch.float32, torch.device("cpu"), link)
    src = torch.arange(5, dtype=torch.float32)
    pool.copy(1, src, tag=3)
    pool.wait(1)
    pool.free(1)
    pool.drain()
    assert len(pool) == 2
    torch.testing.assert_close(pool.buffers[1][:5], src)
    assert link.stats().bytes == src.numel() * src.element_size()
    link.close()

"""Predicted seconds per token from a plan's byte counts and a GPU's bandwidths.

A token costs at least its link bytes / link bandwidth and its device reads / memory bandwidth;
pipelined schedules pay the larger, the published serial loop pays both plus a device-wide
synchronize twice per layer. Sirius amortises one full pass and K-1 sparse steps over AAL tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

PCIE_GBPS = {4: 25.0, 5: 50.0}  # achievable host->device GB/s of an x16 slot, by generation
SYNC_S = 1e-3  # one device-wide synchronize in the published serial loop


@dataclass(frozen=True)
class GpuPreset:
    memory_gib: float
    memory_gbps: float  # device memory bandwidth
    pcie_gen: int

    @property
    def link_gbps(self) -> float:
        return PCIE_GBPS[self.pcie_gen]


GPUS = {
    "rtx3090": GpuPreset(24, 936, 4),
    "rtx4090": GpuPreset(24, 1008, 4),
    "rtx5090": GpuPreset(32, 1792, 5),
    "a100-40g": GpuPreset(40, 1555, 4),
    "a100-80g": GpuPreset(80, 2039, 4),
    "l40": GpuPreset(48, 864, 4),
    "h100": GpuPreset(80, 3350, 5),
}


@dataclass(frozen=True)
class Costs:
    """Bytes of one model under a plan: what moves and what is read, per kind of pass."""

    layers: int
    layer_bytes: int  # one whole layer
    prefix_bytes: int  # attention + selected neurons of one layer
    head_bytes: int  # lm_head (+ final norm), read every pass
    full_pass_link: int  # bytes a full pass moves under ferry's plan
    sparse_step_link: int  # bytes a sparse step moves under ferry's plan


def _time(link_bytes: float, read_bytes: float, link_gbps: float, mem_gbps: float, serial: bool,
          layers: int) -> float:
    link, read = link_bytes / (link_gbps * 1e9), read_bytes / (mem_gbps * 1e9)
    return link + read + 2 * layers * SYNC_S if serial else max(link, read)


def predict(c: Costs, link_gbps: float, mem_gbps: float, period: int, aal: float) -> dict[str, float]:
    """s/token for dense streaming, sparse only, Sirius as published, and ferry's schedule."""
    full_read = c.layers * c.layer_bytes + c.head_bytes
    sparse_read = c.layers * c.prefix_bytes + c.head_bytes
    published_full = _time(c.layers * c.layer_bytes, full_read, link_gbps, mem_gbps, True, c.layers)
    published_sparse = _time(c.layers * c.prefix_bytes, sparse_read, link_gbps, mem_gbps, True, c.layers)
    ferry_full = _time(c.full_pass_link, full_read, link_gbps, mem_gbps, False, c.layers)
    ferry_sparse = _time(c.sparse_step_link, sparse_read, link_gbps, mem_gbps, False, c.layers)
    return {
        "dense": published_full,
        "sparse": published_sparse,
        "sirius_published": ((period - 1) * published_sparse + published_full) / aal,
        "ferry": ((period - 1) * ferry_sparse + ferry_full) / aal,
        "ferry_dense": ferry_full,
    }

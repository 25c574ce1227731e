"""Predicted seconds per token from a plan's byte counts and a GPU's bandwidths.

A pass costs its link bytes / link bandwidth and its device reads / memory bandwidth. The
pipelined schedule pays the larger of the two per pass, the serial one their sum, and the
published Sirius loop also a device-wide synchronize twice per layer. Correction amortises K-1
sparse steps and one full pass (over K tokens, one read of the weights) over AAL committed tokens:

    s/token = ((K - 1) * t_sparse_step + t_full_pass) / AAL

Every byte count comes from the Plan (layer and prefix sizes, what streams, lm_head), so plans
for other dtypes or quantized layers get predictions unchanged. Left out: KV-cache reads (about
1% of a 70B token at 4K context), kernel launches and host-side time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ferry.errors import FerryError
from ferry.offload.accounting import StepBytes
from ferry.offload.planner import GiB, Plan, fmt_bytes

PCIE_GBPS = {3: 12.5, 4: 25.0, 5: 50.0}  # achievable host->device GB/s of an x16 slot, by generation
SYNC_S = 1e-3  # one device-wide synchronize in the published serial loop
SCHEDULES = ("pipelined", "serial", "published")
KEYS = ("dense", "sparse", "sirius_published", "ferry")


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
    "h100": GpuPreset(80, 3350, 5),  # SXM
    "h100-pcie": GpuPreset(80, 2000, 5),
    "h200": GpuPreset(140, 4800, 5),  # 143,771 MiB
}


@dataclass(frozen=True)
class Gpu:
    """The card a prediction assumes: a preset with any field overridden, or measured figures."""

    name: str
    memory_gbps: float  # device memory bandwidth
    link_gbps: float  # host->device
    memory_bytes: int = 0  # 0: unknown (predictions do not need it)

    def __post_init__(self) -> None:
        if not (self.memory_gbps > 0 and self.link_gbps > 0 and self.memory_bytes >= 0):
            raise FerryError(f"GPU bandwidths must be positive: {self}")


def resolve_gpu(name: str = "rtx4090", *, memory_bytes: int | None = None, memory_gbps: float | None = None,
                link_gbps: float | None = None) -> Gpu:
    """A preset by name; any field given replaces the preset's (the link default follows its PCIe generation)."""
    preset = GPUS.get(name)
    if preset is None:
        raise FerryError(f"unknown GPU {name!r}; presets: {', '.join(GPUS)} (any field can be "
                         f"overridden: memory, memory bandwidth, link bandwidth)")
    return Gpu(name, memory_gbps or preset.memory_gbps, link_gbps or preset.link_gbps,
               memory_bytes or int(preset.memory_gib * GiB))


@dataclass(frozen=True)
class Estimate:
    s_per_token: float
    bytes_per_token: float  # host->device bytes per committed token
    bound: str  # "link" or "memory": whichever of the two takes longer over a cycle


@dataclass(frozen=True)
class _Pass:
    link: float  # bytes moved host -> device
    read: float  # bytes read from device memory
    syncs: int  # device-wide synchronizes


def _cycle(passes: list[tuple[int, _Pass]], tokens: float, gpu: Gpu, schedule: str) -> Estimate:
    """Time of `count` runs of each pass, spread over the `tokens` they commit."""
    link_s = read_s = total = moved = 0.0
    for count, p in passes:
        link, read = p.link / (gpu.link_gbps * 1e9), p.read / (gpu.memory_gbps * 1e9)
        total += count * (max(link, read) if schedule == "pipelined" else link + read + p.syncs * SYNC_S)
        link_s, read_s, moved = link_s + count * link, read_s + count * read, moved + count * p.link
    return Estimate(total / tokens, moved / tokens, "link" if link_s >= read_s else "memory")


def _speculative(full: _Pass, sparse: _Pass, drafts: int, tokens: float, gpu: Gpu) -> Estimate:
    """A chunk whose K-1 drafts run inside the full pass's link time (speculation): the cycle
    costs the larger of the full pass's link and all the compute, not their sum."""
    link = full.link / (gpu.link_gbps * 1e9)
    sparse_s = max(sparse.link / (gpu.link_gbps * 1e9), sparse.read / (gpu.memory_gbps * 1e9))
    compute = full.read / (gpu.memory_gbps * 1e9) + drafts * sparse_s
    moved = full.link + drafts * sparse.link
    return Estimate(max(link, compute) / tokens, moved / tokens, "link" if link >= compute else "memory")


def predict(c: StepBytes, gpu: Gpu, period: int = 16, aal: float | None = None,
            schedule: str = "pipelined", speculate: bool = False) -> dict[str, Estimate]:
    """dense and sparse decoding and Sirius ("ferry") under the plan's residency and `schedule`;
    Sirius as published: serial with device-wide synchronizes, every layer streaming (its sparse
    steps the selected prefix, its full passes whole layers). aal defaults to the period (every
    draft kept). speculate: the next chunk's drafts run during the full pass (pipelined, the
    sparse set resident, the full pass streaming); counted as if every speculation is kept."""
    aal = float(period) if aal is None else aal
    if period < 1 or not 0 < aal <= period:
        raise FerryError(f"need period >= 1 and 0 < AAL <= period, got period {period}, AAL {aal}")
    if schedule not in SCHEDULES:
        raise FerryError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    n = c.layers
    syncs = 2 * n if schedule == "published" else 0
    full, sparse = _Pass(c.full_link, c.full_read, syncs), _Pass(c.sparse_link, c.sparse_read, syncs)
    dense = _cycle([(1, full)], 1, gpu, schedule)
    published = [(period - 1, _Pass(c.sparse_stored, c.sparse_read, 2 * n)),
                 (1, _Pass(c.full_stored, c.full_read, 2 * n))]
    overlap = speculate and schedule == "pipelined" and c.full_link > 0 and period > 1
    ferry = (_speculative(full, sparse, period - 1, aal, gpu) if overlap
             else _cycle([(period - 1, sparse), (1, full)], aal, gpu, schedule))
    return {
        "dense": dense,
        "sparse": _cycle([(1, sparse)], 1, gpu, schedule),
        "sirius_published": _cycle(published, aal, gpu, "published"),
        # Without sparsity ferry decodes densely (there is nothing to correct).
        "ferry": ferry if c.sparse_read < c.full_read else dense,
    }


def predict_for_plan(plan: Plan, gpu: Gpu, *, period: int = 16, aal: float | None = None,
                     schedule: str = "pipelined", speculate: bool = False) -> dict[str, Estimate]:
    """The predictions for a plan as `make_plan` (or a loaded engine's `.plan`) gives it: what
    `ferry plan` prints, and what measurements are set beside. speculate applies only where the
    scheduler would speculate: every selected set resident (a sparse step moves no layer bytes)."""
    return predict(plan.step_bytes, gpu, period, aal, schedule, speculates(plan, speculate))


def speculates(plan: Plan, speculate: bool) -> bool:
    """Whether decoding under this plan speculates when asked to: the selected sets are all
    resident (drafting moves no layer bytes) and the full pass streams."""
    resident = len(plan.prefix_layers) + len(plan.resident_layers) == plan.num_layers
    return speculate and plan.sparsity > 0 and resident and bool(plan.streamed_layers)


def implied_aal(dense_s: float, sparse_s: float, sirius_s: float, period: int) -> float:
    """The AAL that makes ((K-1) * sparse + dense) / AAL equal a measured Sirius s/token."""
    return ((period - 1) * sparse_s + dense_s) / sirius_s


def predictions_json(preds: dict[str, Estimate], gpu: Gpu, period: int, aal: float | None,
                     schedule: str, speculate: bool = False) -> dict:
    return {
        "gpu": asdict(gpu), "period": period, "aal": float(period) if aal is None else aal, "schedule": schedule,
        "speculate": speculate,
        "s_per_token": {k: e.s_per_token for k, e in preds.items()},
        "bytes_per_token": {k: e.bytes_per_token for k, e in preds.items()},
        "bound": {k: e.bound for k, e in preds.items()},
    }


_LABELS = {"dense": "dense streaming", "sparse": "sparse only", "sirius_published": "Sirius as published",
           "ferry": "ferry (Sirius)"}


def describe_predictions(preds: dict[str, Estimate], gpu: Gpu, period: int, aal: float | None,
                         schedule: str, speculate: bool = False) -> str:
    """The predictions as a short table, for under the plan's description."""
    aal = float(period) if aal is None else aal
    rows = [f"predicted    {gpu.name}: link {gpu.link_gbps:g} GB/s, memory {gpu.memory_gbps:g} GB/s; "
            f"K={period}, AAL {aal:g}; {schedule}{', speculating' if speculate else ''} "
            f"(Sirius as published: serial)",
            f"  {'':20} {'s/token':>8} {'tokens/s':>9} {'bytes/token':>12}  bound"]
    for key, e in preds.items():
        rows.append(f"  {_LABELS.get(key, key):20} {e.s_per_token:8.3f} {1 / e.s_per_token:9.2f} "
                    f"{fmt_bytes(e.bytes_per_token):>12}  {e.bound}")
    return "\n".join(rows)

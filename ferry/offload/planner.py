"""The memory planner: what stays on the device, what streams, and the bytes each token moves.

A pure function of the model config, the dtype, the budgets, the context length and the prefetch
depth, so `ferry plan` answers for a 70B config instantly without allocating anything.

Priority for device memory: the KV cache, activation workspace, final norm and lm_head (needed
every token), then the streaming slots, then as many whole layers as fit (the first ones: while
they compute, the link fills the slots for the streamed ones), and the input embeddings last:
kept in host memory they cost one row per token on the link.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ferry.errors import FerryError, SettingError
from ferry.model.config import ModelConfig
from ferry.model.quant import QuantConfig, head_group
from ferry.offload.accounting import StepBytes, kernel_note, link_bytes, part_bytes, pass_reads

GiB = 1 << 30
MiB = 1 << 20
DEVICE_MARGIN = 1 * GiB  # left free for the CUDA context and allocator fragmentation
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
          "tb": 1e12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'20GiB', '512MB', '1.5g' or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise FerryError(f"cannot read {text!r} as a memory size (examples: 20GiB, 512MB, 1.5GB)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise FerryError(f"memory size must be positive, got {text!r}")
    return size


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Plan:
    device: str
    dtype_bytes: int
    ctx: int
    prefetch_depth: int
    budget_bytes: int  # device (tier) budget
    host_available_bytes: int
    layer_bytes: int
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]  # from the host store (prefix-resident ones included)
    kv_cache_bytes: int
    workspace_bytes: int
    lm_head_bytes: int
    norm_bytes: int
    embed_bytes: int
    embed_on_device: bool
    slot_count: int
    device_bytes: int  # everything the plan places on the device
    host_bytes: int  # the host store: streamed layers (+ embeddings when kept there)
    link_bytes: dict[str, int] = field(default_factory=dict)  # per pass: full_pass, sparse_step
    read_bytes: dict[str, int] = field(default_factory=dict)  # per pass, the layers' device reads
    problems: tuple[str, ...] = ()
    sparsity: float = 0.0
    prefix_layers: tuple[int, ...] = ()  # streamed layers whose selected neurons stay resident
    prefix_bytes: int = 0  # attention + selected neurons of one layer
    sparse_method: str = "griffin"  # griffin reads a prefix of each layer; cats whole layers
    quant: str = "none"  # none, int8, int4: layer, prefix and slot bytes are then the packed sizes
    quant_group: int = 0  # values per quantization scale (0: not quantized)
    batch_size: int = 1  # sequences decoded together: KV cache and workspace are for all of them
    lm_head_quant: str = "none"  # int8: lm_head held as int8 groups
    resident_layer_bytes: int = 0  # a whole resident layer as held (packed kernel form); 0: layer_bytes

    @property
    def num_layers(self) -> int:
        return len(self.resident_layers) + len(self.streamed_layers)

    @property
    def step_bytes(self) -> StepBytes:
        """Bytes each kind of pass moves and reads under this plan (what the cost model prices)."""
        head = (self.lm_head_bytes or self.embed_bytes) + self.norm_bytes
        return StepBytes.of(self.num_layers, head, self.link_bytes, self.read_bytes, self.layer_bytes, self.prefix_bytes)

    @property
    def pinned_bytes(self) -> int:
        """Host memory the loader page-locks: the streamed layers' buffers on a CUDA device (each
        locked at its exact size, see `pinned.host_empty`), 0 elsewhere. Embeddings kept in host
        memory are not pinned (one row per token moves), so they are not counted here."""
        if not self.device.startswith("cuda"):
            return 0
        return len(self.streamed_layers) * self.layer_bytes

    @property
    def fits(self) -> bool:
        return not self.problems

    def check(self) -> "Plan":
        if self.problems:
            raise FerryError("the model does not fit: " + "; ".join(self.problems))
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        for name in ("resident_layers", "streamed_layers", "prefix_layers"):
            d[name] = list(d[name])
        d["resident_bytes"] = self.device_bytes
        d["pinned_bytes"] = self.pinned_bytes
        return d


def make_plan(
    cfg: ModelConfig, *, dtype_bytes: int, budget_bytes: int, host_available_bytes: int,
    ctx: int, prefetch_depth: int = 2, device: str = "cpu", sparsity: float = 0.0,
    sparse_method: str = "griffin", prefix_resident: bool = True, quant: QuantConfig = QuantConfig("none"),
    batch_size: int = 1,
) -> Plan:
    """With Griffin sparsity a sparse step reads a prefix of each layer (attention + the selected
    neurons); CATS reads whole layers (every gate row is needed). prefix_resident: with Griffin,
    keep the selected neurons of streamed layers on the device. Per byte of device memory that
    saves more link traffic than whole layers do (a prefix is read by every sparse step and
    spares the full pass its bytes too), so prefixes take the room first, then the leftover
    turns prefixes into whole resident layers.
    quant: layers, prefixes and slots hold packed integers and scales; the workspace adds one
    dequantization tile; lm_head is int8 when quant.head_quantized.
    batch_size: B sequences of up to ctx tokens each; their KV caches and one prefill over all
    their prompts take B times the room of one (both grow with the tokens held)."""
    for what, value in (("prefetch depth", prefetch_depth), ("context length", ctx), ("batch size", batch_size)):
        if value < 1:
            raise FerryError(f"{what} must be at least 1, got {value}")
    parts = part_bytes(cfg, dtype_bytes, ctx * batch_size, quant, sparsity, device)
    layer, prefix, embed, lm_head = parts.layer, parts.prefix, parts.embed, parts.lm_head
    whole = parts.resident_layer or layer  # a resident layer as the device holds it
    head_is_embed = lm_head == 0  # tied and not quantized: the embedding table serves as lm_head
    fixed = parts.kv_cache + parts.workspace + parts.norm + (embed if head_is_embed else lm_head)
    row_sparse = sparsity > 0 and sparse_method == "griffin"
    n_resident, slots, n_prefix = _place_layers(cfg.num_layers, budget_bytes - fixed, layer, prefix,
                                                prefetch_depth, row_sparse and prefix_resident, whole)
    problems = _budget_problems(budget_bytes, fixed, parts, slots, _tokens(ctx, batch_size))
    streamed = tuple(range(n_resident, cfg.num_layers))
    embed_on_device = head_is_embed or (
        not streamed and budget_bytes - fixed - cfg.num_layers * whole >= embed)
    device_bytes = (fixed + n_resident * whole + slots * layer + n_prefix * prefix
                    + (embed if embed_on_device and lm_head else 0))
    host_bytes = len(streamed) * layer + (0 if embed_on_device else embed)
    # A CPU "device" is a tier of the same RAM as the host store.
    host_need = host_bytes + (device_bytes if device == "cpu" else 0)
    if host_need > host_available_bytes:
        problems.append(f"host memory: {fmt_bytes(host_need)} needed ({len(streamed)} streamed layers of "
                        f"{fmt_bytes(layer)}{'' if embed_on_device else ', embeddings'}"
                        f"{', the CPU device tier' if device == 'cpu' else ''}), "
                        f"{fmt_bytes(host_available_bytes)} available")
    moved = link_bytes(layer, prefix, len(streamed), n_prefix, 0 if embed_on_device else parts.embed_row,
                       row_sparse)
    reads = pass_reads(cfg, dtype_bytes, quant, sparsity, n_resident, device)
    return Plan(
        device=device, dtype_bytes=dtype_bytes, ctx=ctx, prefetch_depth=slots or prefetch_depth,
        budget_bytes=budget_bytes, host_available_bytes=host_available_bytes, layer_bytes=layer,
        resident_layers=tuple(range(n_resident)), streamed_layers=streamed, kv_cache_bytes=parts.kv_cache,
        workspace_bytes=parts.workspace, lm_head_bytes=lm_head, norm_bytes=parts.norm, embed_bytes=embed,
        embed_on_device=embed_on_device, slot_count=slots, device_bytes=device_bytes,
        host_bytes=host_bytes, link_bytes=moved, read_bytes=reads, problems=tuple(problems), sparsity=sparsity,
        prefix_layers=streamed[:n_prefix], prefix_bytes=prefix, sparse_method=sparse_method,
        quant=quant.method, quant_group=parts.quant_group, batch_size=batch_size,
        lm_head_quant="int8" if quant.head_quantized and head_group(cfg, quant) else "none",
        resident_layer_bytes=parts.resident_layer,
    )


def _budget_problems(budget: int, fixed: int, parts, slots: int, tokens: str) -> list[str]:
    """What keeps the device budget from holding the fixed parts, or them and the slots."""
    if budget < fixed:
        return [f"the device budget {fmt_bytes(budget)} is below the {fmt_bytes(fixed)} needed before "
                f"any layer (KV cache for {tokens} {fmt_bytes(parts.kv_cache)}, lm_head "
                f"{fmt_bytes(parts.lm_head or parts.embed)}, workspace {fmt_bytes(parts.workspace)})"]
    if slots and (budget - fixed) // parts.layer < slots:
        return [f"the device budget {fmt_bytes(budget)} cannot hold {slots} streaming "
                f"slot(s) of one layer ({fmt_bytes(parts.layer)} each) beside the {fmt_bytes(fixed)} of KV "
                f"cache, lm_head and workspace; raise the device budget or lower the prefetch depth"]
    return []


def _tokens(ctx: int, batch: int) -> str:
    return f"{ctx} tokens" if batch == 1 else f"{batch} sequences of {ctx} tokens"


def _place_layers(n_layers: int, room: int, layer: int, prefix: int, depth: int,
                  prefixes: bool, whole: int | None = None) -> tuple[int, int, int]:
    """(whole resident layers, streaming slots, resident prefixes) in `room` bytes of device
    memory: everything when it fits, else `depth` slots and, with prefixes, as many selected
    prefixes as fit, the leftover turning prefixes into whole layers. layer: a layer as stored
    (a slot's size); whole: a resident layer as the device holds it (default: the same)."""
    whole = whole or layer
    if room >= n_layers * whole:
        return n_layers, 0, 0
    if not (prefixes and prefix < whole):
        return max(0, (room - depth * layer) // whole), depth, 0
    # The sparse set comes before prefetching: fewer slots (at least one) when that keeps every
    # layer's selected neurons resident. A sparse step then moves nothing at all, while a full
    # pass loses only the overlap of one layer's copy with the previous one's compute.
    slots = next((d for d in range(depth, 0, -1) if room - d * layer >= n_layers * prefix), depth)
    spare = max(0, room - slots * layer)
    n_prefix = min(n_layers, spare // prefix)
    n_resident = min(n_prefix, (spare - n_prefix * prefix) // (whole - prefix)) if n_prefix == n_layers else 0
    return n_resident, slots, n_prefix - n_resident


def describe(plan: Plan, cfg: ModelConfig, name: str) -> str:
    """The plan as a short human-readable table."""
    n = cfg.num_layers
    rows = [
        f"model        {name}: {cfg.architecture}, {n} layers, hidden {cfg.hidden_size}, "
        f"MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}",
        f"device       {plan.device}, budget {fmt_bytes(plan.budget_bytes)}, "
        f"{plan.dtype_bytes} bytes/parameter, context {plan.ctx} tokens",
        f"one layer    {fmt_bytes(plan.layer_bytes)}"
        + (f" ({plan.quant}, groups of {plan.quant_group} values with an fp16 scale"
           f"{' and min' if plan.quant == 'int4' else ''}; {kernel_note(cfg, plan)})"
           if plan.quant != "none" else ""),
        "resident:",
        f"  KV cache   {fmt_bytes(plan.kv_cache_bytes)}"
        + (f" ({plan.batch_size} sequences of {plan.ctx} tokens)" if plan.batch_size > 1 else ""),
        f"  workspace  {fmt_bytes(plan.workspace_bytes)}",
        f"  lm_head    {fmt_bytes(plan.lm_head_bytes or plan.embed_bytes)}"
        f"{' (tied to the embeddings)' if not plan.lm_head_bytes else ''}"
        f"{' (int8 groups)' if plan.lm_head_quant == 'int8' else ''}",
        f"  embeddings {'on the device' if plan.embed_on_device else 'in host memory (one row per token moves)'}",
        f"  layers     {len(plan.resident_layers)} of {n} ({fmt_bytes(len(plan.resident_layers) * (plan.resident_layer_bytes or plan.layer_bytes))})",
        f"  slots      {plan.slot_count} x {fmt_bytes(plan.layer_bytes)} for streamed layers",
        *([f"  selected   neurons of {len(plan.prefix_layers)} streamed layers "
           f"({fmt_bytes(plan.prefix_bytes)} each with attention, sparsity {plan.sparsity:g})"]
          if plan.prefix_layers else []),
        f"  total      {fmt_bytes(plan.device_bytes)}",
        f"streamed     {len(plan.streamed_layers)} layers from host memory ({fmt_bytes(plan.host_bytes)} host store)",
        f"full pass    {fmt_bytes(plan.link_bytes['full_pass'])} cross the link (a dense token)"
        + _per_sequence(plan.link_bytes["full_pass"], plan.batch_size),
        *([f"sparse step  {fmt_bytes(plan.link_bytes['sparse_step'])} cross the link"
           + _per_sequence(plan.link_bytes["sparse_step"], plan.batch_size)] if plan.sparsity > 0 else []),
    ]
    if plan.problems:
        rows.append("DOES NOT FIT: " + "; ".join(plan.problems))
    return "\n".join(rows)


def _per_sequence(nbytes: int, batch: int) -> str:
    return f"; {fmt_bytes(nbytes // batch)} per token of a batch of {batch}" if batch > 1 else ""


SCHEDULES = ("serial", "pipelined")


@dataclass(frozen=True)
class OffloadConfig:
    """How weights reach the device. Budgets in bytes; None means "what the machine has"."""

    gpu_memory: int | None = None  # device budget (on a CPU-only machine: the CPU tier's)
    host_memory: int | None = None  # host budget; default: psutil's available memory
    prefetch_depth: int = 2  # streaming slots = layers in flight ahead of compute
    emulate_link_gbps: float | None = None  # emulate a host->device link of this speed (CPU device only)
    schedule: str = "pipelined"  # or "serial": fetch each layer when needed (the oracle)
    resident_sparse: bool = True  # keep the selected neurons of streamed layers on the device

    def __post_init__(self) -> None:
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            raise SettingError("gpu_memory", f"must be positive, got {self.gpu_memory}")
        if self.host_memory is not None and self.host_memory <= 0:
            raise SettingError("host_memory", f"must be positive, got {self.host_memory}")
        if self.prefetch_depth < 1:
            raise SettingError("prefetch_depth", f"must be at least 1, got {self.prefetch_depth}")
        if self.emulate_link_gbps is not None and not self.emulate_link_gbps > 0:
            raise SettingError("emulate_link_gbps", f"must be positive, got {self.emulate_link_gbps}")
        if self.schedule not in SCHEDULES:
            raise SettingError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def default_budgets(device, offload: OffloadConfig) -> tuple[int, int]:
    """(device budget, host budget) from the flags or, failing those, the machine (device: a
    torch.device or its type; a CUDA budget is that card's free memory, counting what torch's
    caching allocator holds but does not use as free)."""
    import psutil

    host = offload.host_memory or psutil.virtual_memory().available
    if offload.gpu_memory is not None:
        return offload.gpu_memory, host
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(0, free - DEVICE_MARGIN), host
    return max(0, host - DEVICE_MARGIN), host  # CPU: everything resident unless told otherwise

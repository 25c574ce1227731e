"""Bytes and parameters per step: the one place they are counted.

The planner places bytes with these counts, the cost model turns them into seconds, generation
statistics report `d_sparse` and effective density from them, and the adaptive period's tuner
weighs a sparse step against a full pass with `sparse_cost_ratio`.

Two currencies:
- bytes, as the plan lays them out (dtype or packed integers): what crosses the link per pass
  under the plan's residency, and what a pass reads from device memory;
- parameters, independent of storage: `d_sparse`, the fraction of the model a sparse step reads
  (attention, the MLP rows it uses, lm_head; embeddings not counted), the paper's figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.kernels import gemv
from ferry.model.config import ModelConfig
from ferry.model.dequant import tile_numel
from ferry.model.forward import PASS_CHUNK
from ferry.kernels.int4pack import supported
from ferry.model.packed import can_pack
from ferry.model.quant import QuantConfig, QuantLayout, head_group
from ferry.model.weights import LayerLayout

MiB = 1 << 20


def kept_neurons(intermediate_size: int, sparsity: float) -> int:
    """Neurons a Griffin sparse step keeps per layer: round((1 - sparsity) * I), at least one."""
    return max(1, round((1 - sparsity) * intermediate_size))


def mlp_density(cfg: ModelConfig, sparsity: float, method: str) -> float:
    """Fraction of MLP neurons a sparse step uses (Griffin rounds to whole neurons)."""
    if method == "griffin":
        return kept_neurons(cfg.intermediate_size, sparsity) / cfg.intermediate_size
    return 1 - sparsity


def d_sparse(cfg: ModelConfig, sparsity: float, method: str) -> float:
    """Fraction of parameters a sparse step reads. CATS reads every gate row (to decide) and
    the kept up/down rows; Griffin reads only the kept neurons."""
    h = cfg.hidden_size
    attn = h * (cfg.q_size + 2 * cfg.kv_size) + h * cfg.q_size
    mlp = 3 * h * cfg.intermediate_size
    keep = mlp_density(cfg, sparsity, method)
    used = mlp * keep if method == "griffin" else mlp * (1 + 2 * keep) / 3
    head = cfg.vocab_size * h
    return (cfg.num_layers * (attn + used) + head) / (cfg.num_layers * (attn + mlp) + head)


@dataclass(frozen=True)
class PartBytes:
    """Bytes of each part of a model as stored: layers and prefixes in the compute dtype or
    packed integers; embeddings, lm_head, norm, KV cache and workspace in the compute dtype."""

    layer: int  # one decoder layer
    prefix: int  # attention + the selected neurons of one layer
    embed: int  # input embeddings
    embed_row: int  # one embedding row (what a token moves when embeddings stay on the host)
    lm_head: int  # 0 when the embedding table itself serves as lm_head (tied, not quantized)
    norm: int  # final norm
    kv_cache: int  # keys and values for ctx positions
    workspace: int  # a prefill's activations over ctx tokens (+ what dequantization writes)
    quant_group: int  # values per quantization scale (0: not quantized)
    resident_layer: int = 0  # a whole resident layer as the device holds it (0: the same as layer)


def head_bytes(cfg: ModelConfig, dtype_bytes: int, quant: QuantConfig) -> int:
    """lm_head as held: int8 codes plus, per group, the kernel's two tables of a scale and a zero
    in the compute dtype (`ferry.model.packed.int8_head`; an upper bound for the tiled form, which
    keeps one fp16 scale); the compute dtype when not quantized, 0 when tied to the embeddings."""
    group = head_group(cfg, quant) if quant.head_quantized else 0
    if group:
        return cfg.vocab_size * (cfg.hidden_size + cfg.hidden_size // group * 4 * dtype_bytes)
    return 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * dtype_bytes


def packed_layer_bytes(cfg: ModelConfig, quant: QuantConfig, dtype_bytes: int, sparsity: float) -> int:
    """A resident layer in the packed kernel's form (`ferry.model.packed.pack_layer`): each
    matrix's codes and its tables of a scale and a zero per group in the compute dtype (int8:
    two nibble matrices, two tables), norms and biases in the compute dtype, the neurons'
    checkpoint positions (int64), and with sparsity the tables of the selected rows of gate and
    up, copied whole for the kernel."""
    q, b, h, i = QuantLayout.for_config(cfg, quant), dtype_bytes, cfg.hidden_size, cfg.intermediate_size
    parts = 1 if q.bits == 4 else 2
    shapes = [(cfg.q_size + 2 * cfg.kv_size, h), (h, cfg.q_size), (i, h), (i, h), (h, i)]
    total = sum(n * k * q.bits // 8 + parts * (k // q.group) * n * 2 * b for n, k in shapes)
    total += (2 * h + (cfg.q_size + 2 * cfg.kv_size if cfg.attention_bias else 0)) * b + 8 * i
    if sparsity > 0:
        blocks = min(i, -(-kept_neurons(i, sparsity) // 64) * 64)
        total += 2 * parts * (h // q.group) * blocks * 2 * b
    return total


def prefill_bytes(cfg: ModelConfig, b: int, ctx: int) -> int:
    """Activations of a prefill over `ctx` tokens, which each layer computes PASS_CHUNK rows at a
    time (`ferry.model.forward.decoder_layer`): the residual stream and its next value for every
    row; for a chunk's rows, qkv, the attention output, gate, up, SiLU and their product, norms;
    and its attention mask over up to ctx keys, repeated for the query heads of a KV head, with
    the bias in the compute dtype a GPU's attention makes of it."""
    rows, group = min(ctx, PASS_CHUNK), cfg.num_heads // cfg.num_kv_heads
    chunk = rows * (cfg.q_size + 2 * cfg.kv_size + cfg.q_size + 4 * cfg.intermediate_size + 2 * cfg.hidden_size) * b
    mask = rows * ctx * (1 + group * (1 + b))
    return 2 * ctx * cfg.hidden_size * b + chunk + mask


def part_bytes(cfg: ModelConfig, dtype_bytes: int, ctx: int, quant: QuantConfig, sparsity: float,
               device: str = "cpu") -> PartBytes:
    """Quantized layers add one dequantization tile in the compute dtype to the workspace
    (`ferry.model.dequant.tile_numel`), and an int8 lm_head off the kernel its own tile of 4096
    rows; resident layers the packed kernel takes are counted in its form."""
    b, h = dtype_bytes, cfg.hidden_size
    layout = LayerLayout.for_config(cfg)
    store = QuantLayout.for_config(cfg, quant) if quant.enabled else layout
    unit = 1 if quant.enabled else b  # the packed layout counts bytes
    embed = cfg.vocab_size * h * b
    workspace = 16 * MiB + prefill_bytes(cfg, b, ctx)
    return PartBytes(
        layer=store.numel * unit,
        prefix=store.prefix_numel(kept_neurons(cfg.intermediate_size, sparsity)) * unit,
        embed=embed, embed_row=h * b, lm_head=head_bytes(cfg, b, quant), norm=h * b,
        kv_cache=2 * cfg.num_layers * cfg.num_kv_heads * ctx * cfg.head_dim * b,
        workspace=workspace + (tile_numel(layout) * b if quant.enabled else 0)
        + (min(4096, cfg.vocab_size) * h * b if tiled_head(cfg, quant, device, b) else 0),
        quant_group=store.group if quant.enabled else 0,
        resident_layer=packed_layer_bytes(cfg, quant, b, sparsity) if quant.enabled and packed_kernel(
            cfg, quant, device, b) else 0)


def link_bytes(layer: int, prefix: int, streamed: int, prefix_resident: int, embed_row: int,
               row_sparse: bool) -> dict[str, int]:
    """Bytes one pass moves host -> device: a full pass moves whole streamed layers (only the
    complement of a resident prefix), a sparse step the selected prefix of the layers whose
    prefix is not resident (whole layers when selection is per token). embed_row: the input
    embedding row when the embeddings stay in host memory."""
    full = (streamed - prefix_resident) * layer + prefix_resident * (layer - prefix) + embed_row
    sparse = (streamed - prefix_resident) * prefix + embed_row if row_sparse else full
    return {"full_pass": full, "sparse_step": sparse}


@dataclass(frozen=True)
class LayerReads:
    """Device-memory bytes a pass reads (and writes) for one layer, as its kernels do it."""

    full: int
    sparse: int


def layer_reads(cfg: ModelConfig, dtype_bytes: int, quant: QuantConfig, sparsity: float,
                kernel: str = "tiles") -> LayerReads:
    """Unquantized: the weights a pass uses. Quantized, by the kernel that runs the layer
    (`layer_kernel`): "records" (in place, `ferry.kernels.gemv`) reads the bytes a pass uses;
    "packed" (the CPU's int4 kernel) too, but a sparse step reads all of down_proj (it stays in
    checkpoint order); "tiles" reads the packed bytes, then writes and reads every value again
    in the compute dtype."""
    b, layout, k = dtype_bytes, LayerLayout.for_config(cfg), kept_neurons(cfg.intermediate_size, sparsity)
    if not quant.enabled:
        return LayerReads(layout.numel * b, layout.prefix_numel(k) * b)
    q = QuantLayout.for_config(cfg, quant)
    if kernel == "records":
        return LayerReads(q.numel, q.prefix_numel(k))
    if kernel == "packed":
        rest = (cfg.intermediate_size - k) * cfg.hidden_size * q.bits // 8
        return LayerReads(q.numel, q.prefix_numel(k) + rest)
    return LayerReads(q.numel + 2 * layout.numel * b, q.prefix_numel(k) + 2 * layout.prefix_numel(k) * b)


def packed_kernel(cfg: ModelConfig, quant: QuantConfig, device: str, dtype_bytes: int) -> bool:
    """Whether resident quantized layers run on the packed int4 kernel on this device (the CPU's,
    for shapes it takes, in bf16: a 2-byte dtype on a CPU is taken to be bf16, the CPU default)."""
    return device == "cpu" and dtype_bytes == 2 and can_pack(QuantLayout.for_config(cfg, quant), torch.device("cpu"))


def layer_kernel(cfg: ModelConfig, quant: QuantConfig, device: str, dtype_bytes: int, resident: bool) -> str:
    """How a decode-sized pass runs a quantized layer: "records" where the in-place kernels run
    (CUDA with Triton), "packed" for resident layers the CPU's kernel takes, else "tiles"."""
    if gemv.planned(device):
        return "records"
    return "packed" if resident and packed_kernel(cfg, quant, device, dtype_bytes) else "tiles"


KERNEL_NOTES = {"records": "decode-sized passes read it in place (Triton)",
                "packed": "resident layers on the CPU's int4 kernel, the others dequantized by tiles",
                "tiles": "dequantized a tile at a time"}


def kernel_note(cfg: ModelConfig, plan) -> str:
    """How a plan's quantized layers are computed, for `ferry plan`."""
    quant = QuantConfig(plan.quant, plan.quant_group)
    return KERNEL_NOTES[layer_kernel(cfg, quant, plan.device, plan.dtype_bytes, resident=True)]


def tiled_head(cfg: ModelConfig, quant: QuantConfig, device: str, dtype_bytes: int) -> bool:
    """Whether lm_head is int8 groups with a tile to dequantize into (int8 where the CPU's packed
    kernel does not take it; the in-place kernels read it without the tile, wide passes use it)."""
    group = head_group(cfg, quant) if quant.head_quantized else 0
    return bool(group) and not (dtype_bytes == 2 and supported(cfg.vocab_size, cfg.hidden_size, group,
                                                               torch.device(device)))


def pass_reads(cfg: ModelConfig, dtype_bytes: int, quant: QuantConfig, sparsity: float, n_resident: int,
               device: str) -> dict[str, int]:
    """Device bytes each kind of pass reads over all layers, each layer as its kernel reads it
    (`layer_kernel`), plus the dequantization traffic of an int8 lm_head read by tiles."""
    resident, rest = (layer_reads(cfg, dtype_bytes, quant, sparsity,
                                  layer_kernel(cfg, quant, device, dtype_bytes, r) if quant.enabled else "tiles")
                      for r in (True, False))
    n_rest = cfg.num_layers - n_resident
    # an int8 lm_head dequantized by tiles: each value written and read again
    tiles = tiled_head(cfg, quant, device, dtype_bytes) and not gemv.planned(device)
    head = 2 * cfg.vocab_size * cfg.hidden_size * dtype_bytes if tiles else 0
    return {"full_pass": n_resident * resident.full + n_rest * rest.full + head,
            "sparse_step": n_resident * resident.sparse + n_rest * rest.sparse + head}


@dataclass(frozen=True)
class StepBytes:
    """Per kind of pass: bytes crossing the link and bytes read from device memory."""

    layers: int
    head_bytes: int  # lm_head and final norm, read by every pass
    full_link: int
    sparse_link: int
    full_read: int  # every layer (as its kernels read it), lm_head and final norm
    sparse_read: int  # attention + selected neurons of every layer, lm_head and final norm
    full_stored: int = 0  # the same weights' bytes as stored (what streaming them would move)
    sparse_stored: int = 0

    @classmethod
    def of(cls, layers: int, head_bytes: int, link: dict[str, int], reads: dict[str, int],
           layer_bytes: int, prefix_bytes: int) -> "StepBytes":
        """link: bytes each pass moves; reads: bytes the kernels read per pass beyond lm_head's and
        the norm's stored bytes (added here); layer_bytes, prefix_bytes: one layer and its prefix
        as stored."""
        return cls(layers, head_bytes, link["full_pass"], link["sparse_step"], reads["full_pass"] + head_bytes,
                   reads["sparse_step"] + head_bytes, layers * layer_bytes, layers * prefix_bytes)


def sparse_cost_ratio(step: StepBytes, d_sparse_fraction: float) -> float:
    """Cost of a sparse step relative to a full pass: link bytes when the full pass streams
    weights (the link is then the bottleneck), else the fraction of parameters it reads."""
    if step.full_link > 0:
        return step.sparse_link / step.full_link
    return d_sparse_fraction

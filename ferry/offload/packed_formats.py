"""Linear weights stored pre-quantized in a checkpoint, brought to ferry's `Grouped` form.

A weight `X.weight` [out, in] may be stored as other tensors named after X:

- ferry's own form (its GGUF converter writes it), rows in groups along `in`:
  int4: `X.q4` uint8 [out, in / 2] (value 2j in the low nibble of byte j), `X.scales` and
  `X.mins` fp16 [out, in / g]; w = q * scale + min.
  int8: `X.q8` int8 [out, in] (-128 refused), `X.scales` fp16 [out, in / g]; w = q * scale.
- AutoAWQ "gemm" (quant_method awq, 4 bits): `X.qweight` int32 [in, out / 8] and `X.qzeros`
  int32 [in / g, out / 8] pack 8 output columns per word, column 8c + ORDER[k] in bits 4k..4k+3
  of word c with ORDER = 0 2 4 6 1 3 5 7; `X.scales` fp16 [in / g, out]; w = (q - z) * s.
- GPTQ (quant_method gptq, 4 bits): `X.qweight` int32 [in / 8, out] packs 8 *input* rows per
  word (row 8r + k in bits 4k..), `X.qzeros` int32 [in / g, out / 8] packs columns in order,
  `X.scales` fp16 [in / g, out], `X.g_idx` int32 [in] (the group of each input row);
  w = (q - z) * s. The original format ("gptq", v1) stores z - 1, "gptq_v2" stores z.

AWQ and GPTQ map onto int4 `Grouped` with scale = s and minimum = -(z * s) rounded to fp16, so a
weight differs from (q - z) * s by at most half an fp16 ulp of z * s (z * s itself is exact in
fp32: 5-bit z times an 11-bit significand).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.errors import FerryError
from ferry.kernels.quant import Grouped

SUPPORTED = ("AWQ (version gemm, 4 bits, with zero points), GPTQ (4 bits, checkpoint_format gptq or "
             "gptq_v2, desc_act=False) and ferry's own q4/q8 tensors")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ gemm: the column each 4-bit slot of a word holds
IN_ORDER = tuple(range(8))


@dataclass(frozen=True)
class Packing:
    """How one checkpoint stores its grouped linear weights."""

    method: str  # "ferry", "awq" or "gptq"
    bits: int
    group: int = 0  # awq/gptq: group_size from the config, -1 is one group per row; ferry: from shapes
    zero_offset: int = 0  # added to stored zeros: GPTQ v1 stores z - 1
    desc_act: bool = False

    def parts(self) -> tuple[str, ...]:
        """The tensor suffixes a weight in this packing needs (GPTQ's g_idx is optional)."""
        if self.method == "ferry":
            return ("q4", "scales", "mins") if self.bits == 4 else ("q8", "scales")
        return ("qweight", "qzeros", "scales")


FERRY4, FERRY8 = Packing("ferry", 4), Packing("ferry", 8)
OPTIONAL_PARTS = ("g_idx",)


def packing_from_config(qc, source: str) -> Packing | None:
    """config.json's quantization_config -> the packing, refusing what ferry cannot read."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise FerryError(f"{source}: quantization_config must be an object, got {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return _awq_packing(qc, source)
    if method == "gptq":
        return _gptq_packing(qc, source)
    raise FerryError(f"{source}: quant_method {method!r} is not supported; ferry reads {SUPPORTED}")


def _group_size(qc, source: str, *keys: str) -> int:
    group = next((qc[k] for k in keys if k in qc), None)
    if type(group) is not int or not (group == -1 or group > 0):
        raise FerryError(f"{source}: quantization_config group_size must be a positive integer or -1, "
                         f"got {group!r}")
    return group


def _refuse(source: str, what: str) -> FerryError:
    return FerryError(f"{source}: {what} is not supported; ferry reads {SUPPORTED}")


def _awq_packing(qc, source: str) -> Packing:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(source, f"AWQ version {version!r}")
    if str(qc.get("backend", "autoawq")).lower() != "autoawq":
        raise _refuse(source, f"AWQ backend {qc.get('backend')!r} (its packing differs from AutoAWQ's)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise _refuse(source, f"{bits}-bit AWQ")
    if qc.get("zero_point", True) is not True:
        raise _refuse(source, "AWQ without zero points")
    return Packing("awq", 4, _group_size(qc, source, "group_size", "q_group_size"))


def _gptq_packing(qc, source: str) -> Packing:
    bits = qc.get("bits")
    if bits != 4:
        raise _refuse(source, f"{bits}-bit GPTQ")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(source, f"GPTQ checkpoint_format {fmt!r}")
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise _refuse(source, f"GPTQ pack_dtype {qc.get('pack_dtype')!r}")
    return Packing("gptq", 4, _group_size(qc, source, "group_size"), zero_offset=1 if fmt == "gptq" else 0,
                   desc_act=bool(qc.get("desc_act", False)))


def grouped_weights(names, packing: Packing | None, source: str) -> dict[str, Packing]:
    """Weight name -> its packing, for every weight stored grouped (found by its q4, q8 or
    qweight tensor). Refuses packed tensors without a quantization_config to read them by, and a
    weight stored twice."""
    names = set(names)
    found = {}
    for name in names:
        base, _, suffix = name.rpartition(".")
        kind = {"q4": FERRY4, "q8": FERRY8, "qweight": packing}.get(suffix, False)
        if kind is False:
            continue
        if kind is None:
            raise FerryError(f"{source}: {name} is an AWQ/GPTQ packed tensor, but config.json has no "
                             f"quantization_config saying how it is packed")
        weight = f"{base}.weight"
        if weight in names or weight in found:
            raise FerryError(f"{source}: {weight} is stored twice ({name} and another copy)")
        found[weight] = kind
    return found


# --- unpacking ---------------------------------------------------------------------------------
def to_grouped(packing: Packing, parts: dict[str, torch.Tensor], shape: tuple[int, int], where: str) -> Grouped:
    """The stored tensors of one weight [out, in] -> Grouped [out, in], every part checked first
    (a wrong shape or dtype is one FerryError naming it, never garbage weights)."""
    if packing.method == "ferry":
        return _ferry(packing.bits, parts, shape, where)
    return _zero_point(packing, parts, shape, where)


def _expect(parts, part: str, dtype: torch.dtype, shape, where: str) -> torch.Tensor:
    t = parts[part]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise FerryError(f"{where}: {part} is {t.dtype} {list(t.shape)}, but config.json implies "
                         f"{dtype} {list(shape)}")
    return t


def _finite(t: torch.Tensor, part: str, where: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise FerryError(f"{where}: {part} holds NaN or infinite values")
    return t


def _ferry(bits: int, parts, shape, where: str) -> Grouped:
    out, cin = shape
    scales = parts["scales"]
    groups = scales.shape[-1] if scales.dim() == 2 else 0
    if groups == 0 or cin % groups or (bits == 4 and cin % 2):
        raise FerryError(f"{where}: scales {list(scales.shape)} do not split rows of {cin} values into groups")
    scale = _finite(_expect(parts, "scales", torch.float16, (out, groups), where), "scales", where)
    if bits == 8:
        q = _expect(parts, "q8", torch.int8, (out, cin), where)
        if bool((q == -128).any()):
            raise FerryError(f"{where}: q8 holds -128 (int8 codes are in [-127, 127])")
        return Grouped(q, scale, None, 8)
    codes = _expect(parts, "q4", torch.uint8, (out, cin // 2), where)
    mins = _finite(_expect(parts, "mins", torch.float16, (out, groups), where), "mins", where)
    return Grouped(torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2), scale, mins, 4)


def _nibbles(words: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [..., n] -> uint8 [..., 8n]: slot k (bits 4k..4k+3) of word c is value 8c + order[k]."""
    out = torch.empty(*words.shape, 8, dtype=torch.uint8)
    for slot, column in enumerate(order):
        out[..., column] = (words >> (4 * slot)) & 0xF  # arithmetic shift, masked: sign bits drop
    return out.flatten(-2)


def _zero_point(packing: Packing, parts, shape, where: str) -> Grouped:
    """AWQ gemm / GPTQ: w = (q - z) * s with q, z 4-bit, groups of `group` input rows."""
    out, cin = shape
    group = cin if packing.group == -1 else packing.group
    if out % 8 or cin % group or (packing.method == "gptq" and cin % 8):
        raise FerryError(f"{where}: a [{out}, {cin}] weight cannot be {packing.method.upper()}-packed "
                         f"in groups of {group} (needs out and in multiples of 8 and of the group)")
    groups = cin // group
    if packing.method == "awq":
        q = _nibbles(_expect(parts, "qweight", torch.int32, (cin, out // 8), where), AWQ_ORDER).t()
        order = AWQ_ORDER
    else:
        words = _expect(parts, "qweight", torch.int32, (cin // 8, out), where)
        q = _nibbles(words.t(), IN_ORDER)  # packed along in: unpacking the transpose gives [out, in]
        order = IN_ORDER
        _check_g_idx(parts.get("g_idx"), packing, cin, group, where)
    zeros = _nibbles(_expect(parts, "qzeros", torch.int32, (groups, out // 8), where), order)
    s = _finite(_expect(parts, "scales", torch.float16, (groups, out), where), "scales", where)
    z = zeros.float() + packing.zero_offset  # [groups, out]
    minimum = (-(z * s.float())).to(torch.float16)  # the one rounding: half an fp16 ulp of z * s
    _finite(minimum, "zero point * scale (beyond fp16)", where)
    return Grouped(q.contiguous(), s.t().contiguous(), minimum.t().contiguous(), 4)


def _check_g_idx(g_idx: torch.Tensor | None, packing: Packing, cin: int, group: int, where: str) -> None:
    """Contiguous groups only: act-order (desc_act) checkpoints give input rows scattered groups,
    which no per-row group slicing can express; with g_idx == row // group they are plain."""
    if g_idx is None:
        if packing.desc_act:
            raise FerryError(f"{where}: desc_act=True but no g_idx tensor; ferry needs desc_act=False "
                             f"GPTQ checkpoints")
        return
    if g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (cin,):
        raise FerryError(f"{where}: g_idx is {g_idx.dtype} {list(g_idx.shape)}, but config.json implies "
                         f"int32 [{cin}]")
    if not torch.equal(g_idx.long(), torch.arange(cin) // group):
        raise FerryError(f"{where}: g_idx orders input rows by activation (desc_act); ferry needs "
                         f"desc_act=False GPTQ checkpoints, whose groups are contiguous rows")

"""Quantized layer bytes back into the compute dtype: what a pass over a quantized layer runs
before the model math (the layout is `ferry.model.quant.QuantLayout`).

The steps for a buffer and a pass kind are built once as jobs (partials over views), so running
them creates no tensors but down_proj's gathered group rows (`dequantize_down`).
"""

from __future__ import annotations

from functools import partial

import torch

from ferry.kernels.quant import dequantize, unpack_int4
from ferry.model.quant import QuantLayout


def dequantize_down(codes: torch.Tensor, index: torch.Tensor, table: tuple, bits: int, group: int,
                    out: torch.Tensor) -> torch.Tensor:
    """Down columns [n, H] of records (codes [n, Hb], checkpoint indices [n]) through the layer's
    group table: w[j, h] = q * scale[g(j), h] (+ min[g(j), h]) with g(j) = index[j] // group.
    fp32 math, one rounding (torch; the gather makes [n, H] temporaries)."""
    rows = index.long() // group
    q = codes.view(torch.int8) if bits == 8 else unpack_int4(codes)
    x = q.float() * table[0][rows].float()
    if table[1] is not None:
        x += table[1][rows].float()
    return out.copy_(x)


def _mlp_jobs(q: QuantLayout, records: tuple, table: tuple, bundle: torch.Tensor, backend: str) -> list:
    codes, scales, mins, index = records
    return [partial(dequantize, codes[:, :2], scales, mins, q.bits, bundle[:, :2], backend),
            partial(dequantize_down, codes[:, 2], index, table, q.bits, q.group, bundle[:, 2])]


def dequantize_jobs(q: QuantLayout, src: torch.Tensor, out: torch.Tensor, rows: int, backend: str) -> list:
    """The steps that bring the attention part and neurons 0..rows-1 of `src` (uint8, layer
    layout, possibly only that prefix) into `out` (compute dtype, unquantized layout): what a pass
    over `rows` neurons uses. Built once per buffer and pass kind."""
    views = q.base.attention_views(out)
    jobs = []
    for sec in q.sections:
        if sec.name == "down_groups":
            continue
        if len(sec.shape) == 1:
            jobs.append(partial(torch.Tensor.copy_, views[sec.name],
                                src[sec.offset:sec.offset + sec.size].view(torch.float32)))
        else:
            jobs.append(partial(dequantize, *q.matrix(src, sec), q.bits, views[sec.name], backend))
    if rows:
        jobs += _mlp_jobs(q, q.mlp_records(src, 0, rows), q.down_groups(src), q.base.bundle(out, 0, rows), backend)
    return jobs


def record_jobs(q: QuantLayout, raw: torch.Tensor, layer: torch.Tensor, out_bundle: torch.Tensor,
                backend: str) -> list:
    """Records at the start of `raw` (a slot holding complement rows) into out_bundle [n, 3, H];
    `layer` holds the layer's attention part (its down group table)."""
    n = out_bundle.shape[0]
    return _mlp_jobs(q, q.records(raw, n), q.down_groups(layer), out_bundle, backend) if n else []


def dequantize_layer(q: QuantLayout, src: torch.Tensor, out: torch.Tensor, rows: int, backend: str) -> None:
    for job in dequantize_jobs(q, src, out, rows, backend):
        job()

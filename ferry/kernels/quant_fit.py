"""ferry's own quantizer: data-free fitted ranges for int4 (scale and min) and int8 (scale).

For each group of values the plain range (int4: min and max; int8: absmax) is one candidate;
FIT_STEPS more come from stretching the number of levels the range spans by up to one either
way, with the scale (and min) then refitted to the resulting codes by least squares. The
candidate with the least squared weight error wins, so a fitted group is never worse than a
plain one. Mostly this clips a group's outliers a little, trading their error for a finer step
for every other value (the idea of llama.cpp's k-quants search; written for torch here).
"""

from __future__ import annotations

import torch

from ferry.kernels.quant import QMAX, Grouped

FIT_STEPS = 20  # candidate ranges tried per group beside the plain one


def _to_fp16(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError("a weight is too large for fp16 scales")
    return h


def _codes(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The nearest q for x [N, g] under fp16 scale s [N] (and min m [N])."""
    div = torch.where(s == 0, 1.0, s.float())[:, None]
    if m is None:
        return torch.round(x / div).clamp_(-QMAX[8], QMAX[8])
    return torch.round((x - m.float()[:, None]) / div).clamp_(0, QMAX[4])


def _error(x, q, s, m) -> torch.Tensor:
    back = q * s.float()[:, None] + (0 if m is None else m.float()[:, None])
    return (back - x).pow(2).sum(-1)


def _least_squares(x: torch.Tensor, q: torch.Tensor, symmetric: bool):
    """The scale (and min) minimising the squared error for fixed codes q."""
    if symmetric:
        qq = q.pow(2).sum(-1)
        return (q * x).sum(-1) / torch.where(qq == 0, 1.0, qq), None
    n = x.shape[-1]
    sq, sqq, sx, sqx = q.sum(-1), q.pow(2).sum(-1), x.sum(-1), (q * x).sum(-1)
    det = n * sqq - sq * sq
    flat = det == 0  # every code equal: the group's mean is its best single value
    det = torch.where(flat, 1.0, det)
    s = torch.where(flat, 0.0, (n * sqx - sq * sx) / det)
    m = torch.where(flat, sx / n, (sqq * sx - sq * sqx) / det)
    return s, m


def _fit(x: torch.Tensor, bits: int, fit: bool):
    """Scale (and min) for each row of x [N, g], fp16."""
    symmetric = bits == 8
    if symmetric:
        absmax = x.abs().amax(-1)
        s, m = _to_fp16(absmax / QMAX[8]), None  # the plain absmax scale
    else:
        lo, hi = x.amin(-1), x.amax(-1)
        s, m = _to_fp16((hi - lo) / QMAX[4]), _to_fp16(lo)
    best_q = _codes(x, s, m, bits)
    best = _error(x, best_q, s, m)
    if not fit:
        return s, m
    span = absmax if symmetric else hi - lo
    span = torch.where(span == 0, 1.0, span)
    for step in range(FIT_STEPS + 1):
        levels = QMAX[bits] + (step - FIT_STEPS / 2) / (FIT_STEPS / 2)  # QMAX - 1 .. QMAX + 1
        inv = levels / span
        q = torch.round(x * inv[:, None]) if symmetric else torch.round((x - lo[:, None]) * inv[:, None])
        q = q.clamp_(-QMAX[8], QMAX[8]) if symmetric else q.clamp_(0, QMAX[4])
        cs, cm = _least_squares(x, q, symmetric)
        cs = _to_fp16(cs.abs() if symmetric else cs.clamp_min(0))
        cm = None if symmetric else _to_fp16(cm)
        cq = _codes(x, cs, cm, bits)
        err = _error(x, cq, cs, cm)
        better = err < best
        best = torch.where(better, err, best)
        s = torch.where(better, cs, s)
        if not symmetric:
            m = torch.where(better, cm, m)
    return s, m


FIT_CHUNK_VALUES = 1 << 22  # values fitted at a time (bounds the fp32 temporaries)


def fit_groups(w: torch.Tensor, bits: int, group: int, fit: bool = True) -> Grouped:
    """Quantize w [R, C] (any float dtype) in groups of `group`.

    fit=False takes each group's plain range (int4: min and max; int8: absmax); fit=True also
    tries FIT_STEPS ranges around it, refits scale and min to the resulting codes by least
    squares, and keeps whichever has the least squared error (the plain range is a candidate, so
    fitting is never worse on a group)."""
    r, c = w.shape
    if c % group:
        raise ValueError(f"rows of {c} values do not split into groups of {group}")
    if not torch.isfinite(w).all():
        raise ValueError("a weight is NaN or infinite")
    x = w.float().reshape(-1, group)
    s = torch.empty(x.shape[0], dtype=torch.float16)
    m = None if bits == 8 else torch.empty_like(s)
    q = torch.empty(x.shape, dtype=torch.int8 if bits == 8 else torch.uint8)
    step = max(1, FIT_CHUNK_VALUES // group)
    for lo in range(0, x.shape[0], step):
        part = x[lo:lo + step]
        cs, cm = _fit(part, bits, fit)
        s[lo:lo + step] = cs
        if m is not None:
            m[lo:lo + step] = cm
        q[lo:lo + step] = _codes(part, cs, cm, bits).to(q.dtype)
    g = c // group
    return Grouped(q.view(r, c), s.view(r, g), None if m is None else m.view(r, g), bits)


def quantize_rows(w: torch.Tensor, bits: int, group: int, fit: bool = True):
    """w [R, C] -> (codes uint8 [R, C * bits / 8], scales fp16 [R, C / group], mins or None)."""
    return fit_groups(w, bits, group, fit).packed()



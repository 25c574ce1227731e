"""The schedule as data: what one correction chunk computes, and what crosses the link when.

A pure function of the memory plan and the chunk's shape (sparse steps before the full pass,
speculative steps during it). What a (layer, kind) moves is the executor's own rule,
`ferry.offload.layer_store.fetch_span`, applied to the plan; the order is stated here
independently of the executor (`ferry/offload/prefetch.py`): streamed (layer, kind) fetches
form a queue in use order, fetch n goes to slot n % depth, and under the pipelined schedule
fetch n + depth is issued as soon as compute releases fetch n, so a chunk's first fetches are
issued while the previous chunk's full pass finishes and stay in flight while the resident
sparse steps run; under the serial schedule each layer is fetched when needed and waited for.
Tests compare the executor's recorded trace with this list, and `ferry plan --show-schedule` prints
it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ferry.model.weights import Kind
from ferry.offload.layer_store import Where
from ferry.offload.layer_store import fetch_span as span_of
from ferry.offload.planner import Plan, fmt_bytes


@dataclass(frozen=True)
class Step:
    track: str  # "copy" (a fetch is issued) or "compute" (a layer of a pass runs)
    kind: Kind
    layer: int
    step: int  # which sparse step of the chunk (0 for the full pass)
    slot: int | None = None  # the device slot the fetch fills / the layer reads (None: resident)
    span: tuple[int, int] | None = None  # bytes of the layer's host buffer a fetch moves
    speculative: bool = False  # a sparse step run during the full pass
    carried: bool = False  # a fetch for the next chunk, issued during this one

    @property
    def pass_label(self) -> str:
        if self.kind == Kind.FULL:
            return "full pass"
        return f"{'speculative' if self.speculative else 'sparse'} step {self.step}"


def _line(step: Step, first: int, last: int) -> str:
    layers = f"L{first}" if first == last else f"L{first}-{last}"
    where = "resident" if step.slot is None else f"slot {step.slot}"
    if step.track == "copy":
        lo, hi = step.span
        nxt = ", for the next chunk" if step.carried else ""
        return f"    copy    {step.kind:6} {layers:9} bytes {fmt_bytes(lo)}..{fmt_bytes(hi)} -> {where}{nxt}"
    return f"    compute {step.kind:6} {layers:9} {where}"


def _pass_lines(steps: list[Step]) -> list[str]:
    """One pass's steps as text, consecutive resident layers merged into one line."""
    lines, run = [], None  # run: [first step, first layer, last layer] of resident computes
    for step in steps:
        if step.track == "compute" and step.slot is None:
            if run and run[2] == step.layer - 1:
                run[2] = step.layer
                continue
            if run:
                lines.append(_line(run[0], run[1], run[2]))
            run = [step, step.layer, step.layer]
            continue
        if run:
            lines.append(_line(run[0], run[1], run[2]))
            run = None
        lines.append(_line(step, step.layer, step.layer))
    if run:
        lines.append(_line(run[0], run[1], run[2]))
    return lines


def fetch_span(plan: Plan, layer: int, kind: Kind) -> tuple[int, int] | None:
    """Bytes of a layer's host buffer a pass of this kind moves (None: nothing), by the
    executor's rule applied to where the plan puts the layer."""
    if layer in plan.resident_layers:
        where = Where.RESIDENT
    else:
        where = Where.PREFIX if layer in plan.prefix_layers else Where.STREAMED
    prefix = plan.prefix_bytes if plan.sparsity > 0 else plan.layer_bytes  # nothing selected out
    return span_of(where, kind, prefix, plan.layer_bytes, per_token=plan.sparse_method != "griffin")


def spread(steps: int, layers: int) -> list[int]:
    """How many speculative steps run after each layer of the full pass: evenly spread, the
    last after the last layer, so each one overlaps the transfers still in flight."""
    counts = [0] * layers
    for j in range(steps):
        counts[-(-(j + 1) * layers // steps) - 1] += 1
    return counts


def chunk_schedule(plan: Plan, sparse_steps: int, speculative: int = 0,
                   pipelined: bool = True) -> tuple[Step, ...]:
    """Steps of one steady-state chunk: `sparse_steps` sparse steps, then the full pass over the
    chunk with `speculative` sparse steps spread over its layers. Slots are numbered from the
    chunk's first fetch."""
    layers = range(plan.num_layers)
    passes = [(Kind.SPARSE, j) for j in range(sparse_steps)] + [(Kind.FULL, 0)]
    fetches = [(kind, j, i) for kind, j in passes for i in layers if fetch_span(plan, i, kind)]
    if speculative and any(fetch_span(plan, i, Kind.SPARSE) for i in layers):
        raise ValueError("speculative steps need the sparse set resident on the device")
    depth = plan.prefetch_depth
    counts = spread(speculative, plan.num_layers) if speculative else [0] * plan.num_layers
    out: list[Step] = []
    n = 0  # fetches consumed so far
    for kind, j in passes:
        for layer in layers:
            span = fetch_span(plan, layer, kind)
            slot = None if span is None else n % depth
            if span is not None and not pipelined:
                out.append(Step("copy", kind, layer, j, slot, span))
            out.append(Step("compute", kind, layer, j, slot))
            if span is not None:
                if pipelined and fetches:  # the release issues the fetch `depth` ahead
                    ahead = n + depth
                    k, jj, i = fetches[ahead % len(fetches)]
                    out.append(Step("copy", k, i, jj, ahead % depth, fetch_span(plan, i, k),
                                    carried=ahead >= len(fetches)))
                n += 1
            if kind == Kind.FULL:
                done = sum(counts[:layer])
                out += [Step("compute", Kind.SPARSE, i, done + s, None, speculative=True)
                        for s in range(counts[layer]) for i in layers]
    return tuple(out)


def describe_schedule(plan: Plan, steps: tuple[Step, ...]) -> str:
    """The schedule as text: each pass's fetches and computes in order; a sparse step that
    repeats the one before it is summarised."""
    moved = sum(s.span[1] - s.span[0] for s in steps if s.track == "copy")
    fetches = sum(1 for s in steps if s.track == "copy")
    out = [f"one chunk: {fetches} fetches, {fmt_bytes(moved)} over the link, prefetch depth {plan.prefetch_depth}"]
    groups: list[tuple[str, list[Step]]] = []
    for i, step in enumerate(steps):
        owner = step  # a copy is listed with the compute that issues it (pipelined) or uses it (serial)
        if step.track == "copy":
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            serial = nxt is not None and nxt.track == "compute" and (nxt.kind, nxt.layer) == (step.kind, step.layer)
            owner = nxt if serial or not groups else None
        label = owner.pass_label if owner is not None else groups[-1][0]
        if not groups or groups[-1][0] != label:
            groups.append((label, []))
        groups[-1][1].append(step)
    previous, repeats = None, []
    for label, group in groups:
        lines = _pass_lines(group)
        if previous and [re.sub(r"slot \d", "slot", x) for x in lines] == previous:
            repeats.append(label)
            continue
        if repeats:
            out.append(f"  {repeats[0]} .. {repeats[-1]}: the same ({len(repeats)} steps)")
            repeats = []
        out.append(f"  {label}:")
        out += lines
        previous = [re.sub(r"slot \d", "slot", x) for x in lines]
    if repeats:
        out.append(f"  {repeats[0]} .. {repeats[-1]}: the same ({len(repeats)} steps)")
    return "\n".join(out)

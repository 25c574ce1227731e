"""`ferry profile` output: the human report and the Chrome/Perfetto trace."""

from __future__ import annotations

import json
from pathlib import Path

from ferry.errors import FerryError
from ferry.offload.planner import fmt_bytes
from ferry.profile.profiler import PHASES, Run

PHASE_NAMES = {"prefill": "prefill", "sparse_step": "sparse step", "full_pass": "full pass",
               "speculative_step": "speculative"}
COMPUTE, COPY, TOKENS = 1, 2, 3  # trace thread ids


def check_trace_path(path: str | None) -> None:
    """Fail before loading anything when the trace cannot be written."""
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise FerryError(f"--trace {path}: no such folder {parent}")
    if Path(path).is_dir():
        raise FerryError(f"--trace {path} is a folder; give a file name")


# --- the human report ------------------------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def format_report(r: dict) -> str:
    lines = [
        f"ferry profile: {Path(r['model']).name} on {r['device']}, {r['dtype']}, {r['mode']}, "
        f"{r['schedule']}, link {r['link_kind']}; {r['streamed_layers']} of {r['layers']} layers stream",
        f"prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new ({r['finish_reason']}) in "
        f"{r['total_s']:.3f} s",
        "",
        *_phase_table(r),
        "",
        *_layer_table(r["per_layer"]),
        "",
        *_summary_lines(r),
    ]
    return "\n".join(lines)


def _phase_table(r: dict) -> list[str]:
    head = f"{'phase':<12}{'count':>6}{'total ms':>11}{'mean ms':>10}{'max ms':>10}{'wait ms':>10}{'compute ms':>12}"
    rows = [head]
    for name, p in r["phases"].items():
        rows.append(f"{PHASE_NAMES[name]:<12}{p['count']:>6}{_ms(p['total_s']):>11}{_ms(p['mean_s']):>10}"
                    f"{_ms(p['max_s']):>10}{_ms(p['wait_s']):>10}{_ms(p['compute_s']):>12}")
    if r["select_s"]:
        rows.append(f"{'selection':<12}{'':>6}{_ms(r['select_s']):>11}   Griffin's neurons: reorders, prefix copies")
    rows.append(f"{'other':<12}{'':>6}{_ms(r['other_s']):>11}   tokenizing, sampling, acceptance, Python")
    rows.append(f"{'total':<12}{'':>6}{_ms(r['total_s']):>11}")
    return rows


def _layer_time(row: dict) -> float:
    return sum(row[p]["count"] * (row[p]["wait_s"] + row[p]["compute_s"]) for p in PHASES if p in row)


def _layer_table(rows: list[dict], top: int = 5) -> list[str]:
    """The slowest layers (by time over the whole run) and the mean over all layers."""
    phases = [p for p in PHASES if any(p in row for row in rows)]
    out = ["per layer, mean ms per pass (wait / compute); the slowest layers of the run:",
           f"{'layer':>6}  {'where':<16}" + "".join(f"{PHASE_NAMES[p]:>18}" for p in phases)]
    for row in sorted(rows, key=_layer_time, reverse=True)[:top]:
        cells = "".join(f"{_pair(row.get(p)):>18}" for p in phases)
        out.append(f"{row['layer']:>6}  {row['where']:<16}{cells}")
    means = []
    for p in phases:
        present = [row[p] for row in rows if p in row]
        means.append({"wait_s": sum(x["wait_s"] for x in present) / len(present),
                      "compute_s": sum(x["compute_s"] for x in present) / len(present)})
    out.append(f"{'mean':>6}  {'all layers':<16}" + "".join(f"{_pair(m):>18}" for m in means))
    return out


def _pair(cell: dict | None) -> str:
    return "-" if cell is None else f"{cell['wait_s'] * 1e3:.3f} / {cell['compute_s'] * 1e3:.3f}"


def _summary_lines(r: dict) -> list[str]:
    link, lat, mem, pred = r["link"], r["token_latency_s"], r["memory"], r["predicted"]
    out = [f"link      {fmt_bytes(link['bytes'])} in {link['copies']} copies, {link['gbps']:.2f} GB/s while "
           f"busy, overlap {link['overlap']:.2f}, {fmt_bytes(link['bytes_per_token'])} per committed token"]
    latency = "-" if lat is None else f"p50 {_ms(lat['p50'])} / p90 {_ms(lat['p90'])} / p99 {_ms(lat['p99'])} ms"
    out.append(f"tokens    {r['tokens_per_s']:.1f} tok/s decode ({r['end_to_end_tokens_per_s']:.1f} end to end), "
               f"TTFT {_ms(r['ttft_s'])} ms, latency between tokens {latency}")
    if r["mode"] == "sirius":
        aal = "-" if r["aal"] is None else f"{r['aal']:.2f}"
        out.append(f"sirius    AAL {aal}, {r['sparse_steps']} sparse steps, {r['full_passes']} full passes, "
                   f"corrected {r['corrected_fraction']:.2f}, effective density {r['effective_density']:.2f}; "
                   "tokens arrive in bursts after each full pass")
    measured = "n/a on the CPU" if mem["device_peak_bytes"] is None else fmt_bytes(mem["device_peak_bytes"])
    rss_max = "-" if mem["rss_max_bytes"] is None else fmt_bytes(mem["rss_max_bytes"])
    out.append(f"memory    device: plan {fmt_bytes(mem['device_plan_bytes'])}, peak allocated {measured}; "
               f"RSS peak {fmt_bytes(mem['rss_peak_bytes'])} (sampled per pass), process max {rss_max}")
    if pred is not None:
        link_speed = "-" if pred["link_gbps"] is None else f"{pred['link_gbps']:.2f} GB/s"
        ratio = "-" if pred["ratio"] is None else f"{pred['ratio']:.2f}"
        out.append(f"predicted {_ms(pred['s_per_token'])} ms/token, measured {_ms(pred['measured_s_per_token'])} "
                   f"(measured/predicted {ratio}); link {link_speed} ({pred['link_source']}), memory "
                   f"{pred['mem_gbps']:.1f} GB/s ({pred['mem_source']})")
    return out


# --- the trace -----------------------------------------------------------------------------------

def _x(name: str, tid: int, start_s: float, end_s: float, cat: str, args: dict | None = None) -> dict:
    event = {"name": name, "cat": cat, "ph": "X", "pid": 1, "tid": tid,
             "ts": start_s * 1e6, "dur": max(0.0, end_s - start_s) * 1e6}
    if args:
        event["args"] = args
    return event


def _meta(tid: int, name: str) -> list[dict]:
    return [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}},
            {"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": tid}}]


def chrome_trace(run: Run) -> dict:
    """Chrome trace event format (Perfetto, chrome://tracing): passes with their layers nested on
    the compute track, every copy on the copy track, committed tokens as instants. µs since the
    profiler started."""
    events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "ferry"}},
              *_meta(COMPUTE, "compute"), *_meta(COPY, "copy (host to device)"), *_meta(TOKENS, "tokens")]
    for n, p in enumerate(run.passes):
        end = p["start_s"] + p["dur_s"] + p.get("speculative_s", 0.0)  # wall span, nested steps included
        events.append(_x(PHASE_NAMES[p["phase"]], COMPUTE, p["start_s"], end, "pass",
                         {"pass": n, "wait_ms": p["wait_s"] * 1e3, "compute_ms": p["compute_s"] * 1e3}))
        for x in p["layers"]:
            events.append(_x(f"layer {x['layer']}", COMPUTE, x["start_s"], x["end_s"], "layer",
                             {"layer": x["layer"], "wait_ms": x["wait_s"] * 1e3}))
            if x["ready_s"] > x["start_s"]:
                events.append(_x("wait for copy", COMPUTE, x["start_s"], x["ready_s"], "wait"))
            events.append(_x("compute", COMPUTE, x["ready_s"], x["done_s"], "compute"))
    for c in run.copies:
        name = "upload" if c["layer"] is None else f"layer {c['layer']} {c['kind']}"
        events.append(_x(name, COPY, c["start_s"], c["end_s"], "copy",
                         {"layer": c["layer"], "kind": c["kind"], "bytes": c["bytes"]}))
    for n, t in enumerate(run.token_s):
        events.append({"name": f"token {n}", "cat": "token", "ph": "i", "s": "t", "pid": 1,
                       "tid": TOKENS, "ts": t * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path: str, run: Run) -> None:
    try:
        with open(Path(path).expanduser(), "w", encoding="utf-8") as f:
            json.dump(chrome_trace(run), f)
    except OSError as err:
        raise FerryError(f"cannot write --trace: {err}") from None

"""`ferry profile`: one generation, and where its time went (ferry.profile does the measuring)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ferry.cli.flags import add_flags, config_options
from ferry.cli.generate import ENGINE_FLAGS, REQUEST_FLAGS, make_engine, read_prompts, request_options
from ferry.engine import FerryConfig
from ferry.errors import FerryError


def add_parser(sub: Any) -> None:
    prof = sub.add_parser("profile", help="generate once and show where the time goes",
                          description="Run one generation and report time per phase and per layer, "
                                      "the link, token latencies and memory.")
    add_flags(prof, *ENGINE_FLAGS, "prompt", *REQUEST_FLAGS, "warmup", "trace", "gpu", "json")
    prof.set_defaults(run=run, max_new_tokens=64)


def run(args: argparse.Namespace) -> None:
    from ferry.engine.runtime import pick_device
    from ferry.profile import format_report, predict_run, profile_generation, summarize
    from ferry.profile.report import check_trace_path, write_trace

    check_trace_path(args.trace)
    config = FerryConfig.from_options(**config_options(args))
    if args.gpu is not None and pick_device(config.runtime.device) == "cpu":
        raise FerryError("--gpu names the GPU whose memory bandwidth the prediction uses; this run is on the CPU")
    prompt = read_prompts(args)[0]
    engine = make_engine(config, [prompt], args)
    try:
        options = request_options(args)
        for _ in range(args.warmup):
            engine.generate(prompt, **options)
        measured = profile_generation(engine, prompt, **options)
        report = summarize(engine, measured, predict_run(engine, measured, args.gpu))
    finally:
        engine.close()
    # The report first: a trace that cannot be written (the folder went away, no space) is one
    # error line after it, not the loss of the finished measurement.
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    if args.trace:
        write_trace(args.trace, measured)

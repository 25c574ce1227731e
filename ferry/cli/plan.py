"""`ferry plan`: the memory plan and the cost model's predictions from a model's config alone (no
weights are read).

The plan is the one `ferry.engine.runtime.plan_for` makes for the configuration these flags
describe, on the device and with the budgets below: a GPU can be planned for without one
(--gpu NAME, or --device cuda with --gpu-memory), so the device is chosen here, not by the
configuration.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import Any

from ferry.cli.flags import add_flags, config_options
from ferry.engine import FerryConfig
from ferry.errors import FerryError

PLAN_FLAGS = ("model", "dtype", "device", "ctx", "gpu_memory", "host_memory", "prefetch_depth", "quant",
              "quant_group", "quant_fit", "quant_lm_head", "batch_size", "schedule", "resident_sparse", "sparsity", "sparse_method", "mode", "period",
              "max_period", "speculate", "gpu", "gpu_mem_gbps", "pcie_gbps", "aal", "show_schedule", "json",
              "link_gbps")
EMBEDDED = "SmolLM2-135M-Instruct (embedded)"


def add_parser(sub: Any) -> None:
    plan = sub.add_parser("plan", help="show what stays on the device and what streams",
                          description="The memory plan and predicted speed from a model's config alone "
                                      "(no weights are read).")
    add_flags(plan, *PLAN_FLAGS)
    plan.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ferry.engine.runtime import plan_for
    from ferry.model.config import ModelConfig
    from ferry.offload import costmodel
    from ferry.offload.planner import default_budgets, describe
    from ferry.offload.sources import declared_quant, resolve_config

    gpu = costmodel.resolve_gpu(args.gpu or "rtx4090", memory_bytes=args.gpu_memory,
                                memory_gbps=args.gpu_mem_gbps, link_gbps=args.pcie_gbps)
    device, budget = plan_device(args, gpu)
    # The device is the plan's, not the configuration's (which would insist on a CUDA device here).
    config = FerryConfig.from_options(**{**config_options(args), "device": None, "gpu_memory": budget})
    hf_config = resolve_config(config.runtime.model)
    model = ModelConfig.from_hf(hf_config)
    config = replace(config, quant=config.quant.for_source(declared_quant(config.runtime.model, hf_config)))
    budget, host = default_budgets(device, config.offload)
    dtype_bytes = 4 if config.runtime.dtype == "fp32" else 2
    plan = plan_for(config, model, device, dtype_bytes, budget, host)
    # With --period auto the predictions take K = the longest chunk (max period).
    cost = dict(gpu=gpu, period=config.correction.period, aal=args.aal, schedule=config.offload.schedule,
                speculate=config.correction.speculate)
    preds = costmodel.predict_for_plan(plan, **cost)
    cost["speculate"] = costmodel.speculates(plan, cost["speculate"])
    steps = chunk_steps(plan, config) if args.show_schedule else None
    if args.json:
        out = {**plan.to_dict(), **costmodel.predictions_json(preds, **cost)}
        if steps is not None:
            out["steps"] = [asdict(step) for step in steps]
        print(json.dumps(out))
    else:
        print(describe(plan, model, str(args.model or EMBEDDED)))
        print(costmodel.describe_predictions(preds, **cost))
        if steps is not None:
            from ferry.scheduler.schedule import describe_schedule

            print(describe_schedule(plan, steps))
    plan.check()  # a plan that does not fit is printed, then reported as an error (exit 2)


def plan_device(args: argparse.Namespace, gpu) -> tuple[str, int | None]:
    """(device, device budget or None for the machine's): naming a card plans for a GPU with its
    memory less the margin; --gpu-memory wins over both."""
    import torch

    from ferry.offload.planner import DEVICE_MARGIN

    device = args.device if args.device not in (None, "auto") else (
        "cuda" if args.gpu or torch.cuda.is_available() else "cpu")
    budget = args.gpu_memory or (gpu.memory_bytes - DEVICE_MARGIN if args.gpu else None)
    if device == "cuda" and budget is None and not torch.cuda.is_available():
        raise FerryError("no CUDA device here: give --gpu NAME or --gpu-memory to plan for a GPU")
    return device, budget


def chunk_steps(plan, config: FerryConfig):
    """The steady-state correction chunk under this plan: K-1 drafts (plus the speculative token
    and K-1 speculative steps when speculation applies), K the period (or max period)."""
    from ferry.model.weights import Kind
    from ferry.scheduler.schedule import chunk_schedule, fetch_span

    if config.correction.mode != "sirius":
        raise FerryError("--show-schedule shows a correction chunk: give --sparsity > 0 (and --mode sirius)")
    period = config.correction.period
    layers = range(plan.num_layers)
    resident = not any(fetch_span(plan, i, Kind.SPARSE) for i in layers)
    streams = any(fetch_span(plan, i, Kind.FULL) for i in layers)
    speculate = config.correction.speculate and resident and streams and period > 1
    drafts = period - 1 + (1 if speculate else 0)
    return chunk_schedule(plan, drafts, period - 1 if speculate else 0,
                          pipelined=config.offload.schedule == "pipelined")

"""Command line: `ferry generate`, `ferry profile`, `ferry plan` (and `python -m ferry ...`).

Mistakes a user can fix end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from typing import Iterator

from ferry.errors import FerryError


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (not math.isfinite(value) or value < low or value > high or (low_open and value == low)
                or (high_open and value == high)):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def _size(text: str) -> int:
    from ferry.offload.planner import parse_size

    try:
        return parse_size(text)
    except FerryError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_args(p: argparse.ArgumentParser, ctx_help: str) -> None:
    p.add_argument("-m", "--model", help="model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="compute dtype (auto: bf16 on CPU, the checkpoint's half precision on GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--ctx", type=_int_at_least(1), help=ctx_help)
    p.add_argument("--gpu-memory", type=_size, metavar="SIZE",
                   help="device budget, e.g. 20GiB; layers beyond it stream from host memory "
                        "(default: free device memory minus 1 GiB; on a CPU-only machine, the CPU tier's budget)")
    p.add_argument("--prefetch-depth", type=_int_at_least(1), default=2,
                   help="streaming slots: layers in flight ahead of compute (default 2)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="store the layers' weights as group-wise int8/int4 with fp16 scales "
                        "(quantized once at load, cached on disk); default none")
    p.add_argument("--quant-group", type=int, default=None, metavar="G",
                   help="largest group of values sharing one scale (default 128; a multiple of 8 >= 32)")


def quant_config(args: argparse.Namespace):
    from ferry.model.quant import QuantConfig

    if args.quant_group is not None and args.quant == "none":
        raise FerryError("--quant-group needs --quant int8 or --quant int4")
    return QuantConfig(method=args.quant, group_size=128 if args.quant_group is None else args.quant_group)


def _period(text: str) -> int | str:
    return "auto" if text == "auto" else _int_at_least(1)(text)


def add_sparsity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=_float_in(0, 1, high_open=True), default=0.0, metavar="S",
                   help="fraction of MLP neurons dropped in sparse steps, 0 <= S < 1 (default 0: dense)")
    p.add_argument("--sparse-method", choices=["griffin", "cats"], default="griffin",
                   help="griffin: prompt-fixed neurons (default); cats: per-token threshold")


def add_correction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["dense", "sparse", "sirius"],
                   help="sparse steps only, or with periodic correction (default: sirius when --sparsity > 0)")
    p.add_argument("--period", type=_period, default=16, metavar="K|auto",
                   help="one full-weight correction pass per at most K tokens (default 16); auto: "
                        "whenever the sparse model is unsure, at most --max-period tokens")
    p.add_argument("--max-period", type=_int_at_least(1), default=16, metavar="K",
                   help="with --period auto: the longest chunk (default 16)")
    p.add_argument("--draft-confidence", type=_float_in(0, 1), metavar="P",
                   help="with --period auto: end the chunk after a draft the sparse model gives "
                        "probability < P (default: chosen automatically to minimise cost per token)")
    p.add_argument("--threshold", type=_float_in(0, 1), default=0.1, metavar="T",
                   help="probability a draft needs under the full model at temperature 0.6 (default 0.1)")
    p.add_argument("--accept", choices=["threshold", "strict"], default="threshold",
                   help="strict: a draft must equal the full model's argmax (output equals dense greedy)")
    p.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=True,
                   help="while a full pass streams, the resident sparse model drafts the next chunk "
                        "(kept when the pass accepts the whole chunk; default on)")


def add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--link-gbps", type=_float_in(0, math.inf, low_open=True), metavar="X",
                   help="CPU device only: emulate a host-to-device link of X GB/s (tests, benchmarks)")
    p.add_argument("--schedule", choices=["serial", "pipelined"], default="pipelined",
                   help="pipelined prefetch (default) or serial fetch-then-compute (the oracle)")
    add_residency_args(p)


def add_residency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resident-sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the selected neurons of streamed layers on the device when they fit "
                        "(default on; off streams them every sparse step, as published offloading does)")


def add_cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", metavar="NAME", help="card for the predictions: rtx3090, rtx4090 (default), "
                   "rtx5090, a100-40g, a100-80g, l40, h100; naming one also plans for its memory")
    p.add_argument("--gpu-mem-gbps", type=_float_in(0, math.inf, low_open=True), metavar="X",
                   help="device memory bandwidth in GB/s (default: the card's)")
    p.add_argument("--link-gbps", type=_float_in(0, math.inf, low_open=True), metavar="X",
                   help="host-to-device GB/s (default: the card's PCIe generation, 25 for 4.0, 50 for 5.0)")
    p.add_argument("--period", type=_int_at_least(1), default=16, metavar="K",
                   help="one full-weight correction pass per K tokens (default 16)")
    p.add_argument("--aal", type=_float_in(0, math.inf, low_open=True), metavar="A",
                   help="tokens committed per full pass, at most K (default: K, every draft kept)")
    p.add_argument("--schedule", nargs="?", const="pipelined", choices=["pipelined", "serial"],
                   help="ferry's schedule for the predictions (default pipelined); given, also print one "
                        "correction chunk's steps: every fetch and compute in order (--period sets the "
                        "chunk, --speculate/--no-speculate)")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("-n", "--max-new-tokens", type=_int_at_least(0), default=max_new_tokens)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: on when the tokenizer has one)")
    p.add_argument("--temperature", type=_float_in(0, math.inf), default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=_float_in(0, 1, low_open=True), default=1.0)
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def add_profile_parser(sub) -> None:
    from ferry.offload.costmodel import GPUS

    prof = sub.add_parser("profile", help="generate once and show where the time goes",
                          description="Run one generation and report time per phase and per layer, "
                                      "the link, token latencies and memory.")
    add_model_args(prof, "KV cache length in tokens (default: prompt + max new tokens)")
    add_stream_args(prof)
    add_sparsity_args(prof)
    add_correction_args(prof)
    prof.add_argument("-p", "--prompt", help="the prompt (default: read from stdin)")
    add_sampling_args(prof, 64)
    prof.add_argument("--warmup", type=_int_at_least(0), default=0, metavar="N",
                      help="unprofiled generations of the same prompt first (default 0)")
    prof.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace (JSON) of the run")
    prof.add_argument("--gpu", choices=sorted(GPUS),
                      help="GPU preset for the prediction's memory bandwidth (default: recognised from "
                           "the device name, else measured)")
    prof.add_argument("--json", action="store_true", help="one JSON object")
    prof.set_defaults(prompt_file=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="Run large language models on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from prompts",
                         description="Generate text; tokens stream to stdout as they are produced.")
    add_model_args(gen, "KV cache length in tokens (default: longest prompt + max new tokens)")
    add_stream_args(gen)
    add_sparsity_args(gen)
    add_correction_args(gen)
    src = gen.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="the prompt (default: read from stdin)")
    src.add_argument("--prompt-file", help="one prompt a line, or JSON lines with a \"prompt\" field")
    add_sampling_args(gen, 256)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt instead of streamed text")
    add_profile_parser(sub)
    plan = sub.add_parser("plan", help="show what stays on the device and what streams",
                          description="The memory plan from a model's config alone (no weights are read).")
    add_model_args(plan, "context to reserve the KV cache for (default: min(4096, the model's maximum))")
    add_sparsity_args(plan)
    add_residency_args(plan)
    add_cost_args(plan)
    plan.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=True,
                      help="with --schedule: sparse steps during the full pass (when the sparse set is resident)")
    plan.add_argument("--host-memory", type=_size, metavar="SIZE",
                      help="host budget (default: this machine's available memory)")
    plan.add_argument("--json", action="store_true", help="one JSON object")
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return list(_parse_prompt_lines(f, args.prompt_file))
        except OSError as err:
            raise FerryError(f"cannot read --prompt-file: {err}") from None
    if sys.stdin.isatty():
        raise FerryError("no prompt: pass -p TEXT, --prompt-file FILE, or pipe the prompt to stdin")
    return [sys.stdin.read().rstrip("\n")]


def _parse_prompt_lines(lines, name: str) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line).get("prompt")
            except (json.JSONDecodeError, AttributeError):
                prompt = None
            if not isinstance(prompt, str):
                raise FerryError(f"{name}:{number}: a JSON line needs a string \"prompt\" field")
            yield prompt
        else:
            yield line


def run_generate(args: argparse.Namespace) -> None:
    prompts = read_prompts(args)
    engine = make_engine(args, prompts)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, chat=args.chat, ignore_eos=args.ignore_eos)
    for prompt in prompts:
        if args.json:
            result = engine.generate(prompt, **options).to_dict()
            print(json.dumps(result, ensure_ascii=False), flush=True)
            continue
        for token in engine.stream(prompt, **options):
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def run_profile(args: argparse.Namespace) -> None:
    from ferry.profile_report import check_trace_path, profile_command

    check_trace_path(args.trace)
    import torch

    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.gpu is not None and on_cpu:
        raise FerryError("--gpu names the GPU whose memory bandwidth the prediction uses; this run is on the CPU")
    prompts = read_prompts(args)
    profile_command(make_engine(args, prompts), prompts[0], args)


def make_engine(args: argparse.Namespace, prompts: list[str]):
    """The engine the generate/profile flags describe (ctx sized to these prompts)."""
    from ferry.engine import Engine, RuntimeConfig, load_tokenizer
    from ferry.offload.planner import OffloadConfig, fmt_bytes
    from ferry.offload.sources import resolve_model
    from ferry.model.config import ModelConfig
    from ferry.offload.checkpoint import load_hf_config
    from ferry.scheduler.correction import CorrectionConfig
    from ferry.sparse.config import SparsityConfig
    from ferry.text import encode_prompt

    quant = quant_config(args)
    offload = OffloadConfig(gpu_memory=args.gpu_memory, prefetch_depth=args.prefetch_depth,
                            link_gbps=args.link_gbps, schedule=args.schedule,
                            resident_sparse=args.resident_sparse)
    folder = resolve_model(args.model)
    max_positions = ModelConfig.from_hf(load_hf_config(folder)).max_position_embeddings  # validates
    tokenizer = load_tokenizer(folder)
    ctx = args.ctx
    if ctx is None:  # reserve what this run needs, not the model's maximum context
        longest = max(len(encode_prompt(tokenizer, p, args.chat)) for p in prompts)
        ctx = min(longest + max(1, args.max_new_tokens), max_positions)
    runtime = RuntimeConfig(dtype=args.dtype, device=args.device, ctx=ctx)
    sparsity = SparsityConfig(sparsity=args.sparsity, method=args.sparse_method)
    adaptive = args.period == "auto"
    if args.draft_confidence is not None and not adaptive:
        raise FerryError("--draft-confidence needs --period auto")
    correction = CorrectionConfig(
        mode=args.mode or ("sirius" if args.sparsity > 0 else "dense"),
        period=args.max_period if adaptive else args.period, threshold=args.threshold,
        accept=args.accept, adaptive=adaptive, draft_confidence=args.draft_confidence,
        speculate=args.speculate)
    engine = Engine(folder, runtime=runtime, offload=offload, sparsity=sparsity, correction=correction,
                    tokenizer=tokenizer, quant=quant)
    if engine.plan.streamed_layers:
        print(f"ferry: {len(engine.plan.streamed_layers)} of {engine.config.num_layers} layers stream "
              f"from host memory, {fmt_bytes(engine.plan.link_bytes['full_pass'])} per token",
              file=sys.stderr)
    return engine


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from ferry.model.config import ModelConfig
    from ferry.offload import costmodel
    from ferry.offload.planner import DEVICE_MARGIN, OffloadConfig, default_budgets, describe, make_plan
    from ferry.offload.sources import resolve_config

    gpu = costmodel.resolve_gpu(args.gpu or "rtx4090", memory_bytes=args.gpu_memory,
                                memory_gbps=args.gpu_mem_gbps, link_gbps=args.link_gbps)
    quant = quant_config(args)
    cfg = ModelConfig.from_hf(resolve_config(args.model))
    device = args.device if args.device != "auto" else (
        "cuda" if args.gpu or torch.cuda.is_available() else "cpu")
    budget = args.gpu_memory or (gpu.memory_bytes - DEVICE_MARGIN if args.gpu else None)
    if device == "cuda" and budget is None and not torch.cuda.is_available():
        raise FerryError("no CUDA device here: give --gpu NAME or --gpu-memory to plan for a GPU")
    offload = OffloadConfig(gpu_memory=budget, host_memory=args.host_memory,
                            prefetch_depth=args.prefetch_depth)
    budget, host = default_budgets(device, offload)
    dtype_bytes = 4 if args.dtype == "fp32" else 2
    ctx = args.ctx or min(4096, cfg.max_position_embeddings)
    plan = make_plan(cfg, dtype_bytes=dtype_bytes, budget_bytes=budget, host_available_bytes=host,
                     ctx=ctx, prefetch_depth=args.prefetch_depth, device=device, sparsity=args.sparsity,
                     sparse_method=args.sparse_method, prefix_resident=args.resident_sparse,
                     quant=quant)
    cost = dict(gpu=gpu, period=args.period, aal=args.aal, schedule=args.schedule or "pipelined")
    preds = costmodel.predict_for_plan(plan, **cost)
    steps = _chunk_schedule(plan, args) if args.schedule else None
    if args.json:
        out = {**plan.to_dict(), **costmodel.predictions_json(preds, **cost)}
        if steps is not None:
            out["steps"] = [asdict(step) for step in steps]
        print(json.dumps(out))
    else:
        print(describe(plan, cfg, str(args.model or "SmolLM2-135M-Instruct (embedded)")))
        print(costmodel.describe_predictions(preds, **cost))
        if steps is not None:
            from ferry.scheduler.schedule import describe_schedule

            print(describe_schedule(plan, steps))
    plan.check()  # a plan that does not fit is printed, then reported as an error (exit 2)
    return 0


def _chunk_schedule(plan, args: argparse.Namespace):
    """The steady-state chunk under this plan: K-1 drafts (plus the speculative token and K-1
    speculative steps when speculation applies)."""
    from ferry.scheduler.schedule import FULL, SPARSE, chunk_schedule, fetch_span

    period = args.period
    if args.sparsity == 0:
        raise FerryError("--schedule shows a correction chunk: give --sparsity > 0")
    layers = range(plan.num_layers)
    resident = not any(fetch_span(plan, i, SPARSE) for i in layers)
    streams = any(fetch_span(plan, i, FULL) for i in layers)
    speculate = args.speculate and resident and streams and args.schedule is not None and period > 1
    drafts = period - 1 + (1 if speculate else 0)
    return chunk_schedule(plan, drafts, period - 1 if speculate else 0, pipelined=args.schedule == "pipelined")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        if args.command == "generate":
            run_generate(args)
        elif args.command == "profile":
            run_profile(args)
        elif args.command == "plan":
            run_plan(args)
    except FerryError as err:
        print(f"ferry: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (ferry ... | head); nothing left to say
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

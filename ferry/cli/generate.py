"""`ferry generate`, and what `ferry profile` shares with it: the engine flags, reading prompts,
building the engine."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from ferry.cli.flags import add_flags, config_options
from ferry.engine import Engine, FerryConfig
from ferry.errors import FerryError

# The flags that describe the loaded engine (generate and profile).
ENGINE_FLAGS = ("model", "dtype", "device", "ctx", "gpu_memory", "prefetch_depth", "quant", "quant_group",
                "emulate_link_gbps", "schedule", "resident_sparse", "link_gbps",
                "sparsity", "sparse_method", "mode", "period", "max_period", "draft_confidence", "threshold",
                "accept", "speculate", "reuse_prefix")
REQUEST_FLAGS = ("max_new_tokens", "chat", "temperature", "top_p", "seed", "ignore_eos")


def add_parser(sub: Any) -> None:
    gen = sub.add_parser("generate", help="generate text from prompts",
                         description="Generate text; tokens stream to stdout as they are produced.")
    add_flags(gen, *ENGINE_FLAGS)
    add_flags(gen.add_mutually_exclusive_group(), "prompt", "prompt_file")
    add_flags(gen, *REQUEST_FLAGS, "json")
    gen.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    config = FerryConfig.from_options(**config_options(args))
    prompts = read_prompts(args)
    engine = make_engine(config, prompts, args)
    try:
        for prompt in prompts:
            if args.json:
                result = engine.generate(prompt, **request_options(args)).to_dict()
                print(json.dumps(result, ensure_ascii=False), flush=True)
                continue
            for token in engine.stream(prompt, **request_options(args)):
                sys.stdout.write(token.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
    finally:
        engine.close()


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """Per-request options; sampling (temperature, top_p, seed) is in the configuration."""
    return dict(max_new_tokens=args.max_new_tokens, chat=args.chat, ignore_eos=args.ignore_eos)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if getattr(args, "prompt_file", None) is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return list(parse_prompt_lines(f, args.prompt_file))
        except OSError as err:
            raise FerryError(f"cannot read --prompt-file: {err}") from None
    if sys.stdin.isatty():
        raise FerryError("no prompt: pass -p TEXT, --prompt-file FILE, or pipe the prompt to stdin")
    return [sys.stdin.read().rstrip("\n")]


def parse_prompt_lines(lines: Iterable[str], name: str) -> Iterator[str]:
    """Plain lines are prompts; lines starting with "{" are JSON with a "prompt" field."""
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            yield line
            continue
        try:
            prompt = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            prompt = None
        if not isinstance(prompt, str):
            raise FerryError(f"{name}:{number}: a JSON line needs a string \"prompt\" field")
        yield prompt


def make_engine(config: FerryConfig, prompts: list[str], args: argparse.Namespace) -> Engine:
    """The engine of this configuration; without --ctx, its context is sized to these prompts
    (what this run needs, not the model's maximum), so the plan reserves no more."""
    from ferry.engine.runtime import load_tokenizer
    from ferry.offload.planner import fmt_bytes
    from ferry.offload.sources import resolve_model

    folder = resolve_model(config.runtime.model)
    max_positions = _max_positions(folder)  # also: a clear error for a bad or unsupported config
    tokenizer = load_tokenizer(folder)
    runtime = replace(config.runtime, model=str(folder))  # resolved once
    if runtime.ctx is None:
        runtime = replace(runtime, ctx=prompts_ctx(tokenizer, prompts, args, max_positions))
    engine = Engine(replace(config, runtime=runtime), tokenizer=tokenizer)
    plan = engine.plan
    if plan.streamed_layers:
        print(f"ferry: {len(plan.streamed_layers)} of {engine.model.num_layers} layers stream from host "
              f"memory, {fmt_bytes(plan.link_bytes['full_pass'])} per token", file=sys.stderr)
    return engine


def _max_positions(folder: Path) -> int:
    from ferry.model.config import ModelConfig
    from ferry.offload.checkpoint import load_hf_config

    return ModelConfig.from_hf(load_hf_config(folder)).max_position_embeddings


def prompts_ctx(tokenizer: Any, prompts: list[str], args: argparse.Namespace, max_positions: int) -> int:
    from ferry.engine.text import encode_prompt

    longest = max(len(encode_prompt(tokenizer, p, args.chat)) for p in prompts)
    return min(longest + max(1, args.max_new_tokens), max_positions)

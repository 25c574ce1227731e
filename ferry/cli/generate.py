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
from ferry.engine.text import check_text
from ferry.errors import FerryError, SettingError

# The flags that describe the loaded engine (generate and profile).
ENGINE_FLAGS = ("model", "dtype", "device", "ctx", "gpu_memory", "prefetch_depth", "quant", "quant_group", "quant_fit", "quant_lm_head", "threads", "cuda_graphs",
                "emulate_link_gbps", "schedule", "resident_sparse", "link_gbps",
                "sparsity", "sparse_method", "mode", "period", "max_period", "draft_confidence", "threshold",
                "accept", "speculate", "reuse_prefix", "batch_size")
REQUEST_FLAGS = ("max_new_tokens", "chat", "temperature", "top_p", "seed", "ignore_eos")


def add_parser(sub: Any) -> None:
    gen = sub.add_parser("generate", help="generate text from prompts",
                         description="Generate text; tokens stream to stdout as they are produced.")
    add_flags(gen, *ENGINE_FLAGS)
    add_flags(gen.add_mutually_exclusive_group(), "prompt", "prompt_file")
    add_flags(gen, *REQUEST_FLAGS, "json")
    gen.set_defaults(run=run)


DEFAULT_BATCH = 8  # the largest batch a prompt file gets unless --batch-size says otherwise


def run(args: argparse.Namespace) -> None:
    config = FerryConfig.from_options(**config_options(args))
    prompts = read_prompts(args)
    batch = getattr(args, "prompt_file", None) is not None
    engine = make_engine(config, prompts, args)
    failed = 0
    try:
        if batch and engine.runtime.config.runtime.batch_size > 1:
            failed = answer_batched(engine, prompts, args)
        else:
            for number, prompt in enumerate(prompts, 1):
                failed += not answer(engine, prompt, args, f"prompt {number}: " if batch else None)
    finally:
        engine.close()
    if failed:
        raise FerryError(f"{failed} of {len(prompts)} prompts failed")


def answer_batched(engine: Engine, prompts: list[str], args: argparse.Namespace) -> int:
    """Decode the prompts in batches (`ferry.engine.batch`); each answer is printed whole, in
    input order, as soon as it and those before it are done. Returns how many failed."""
    from ferry.engine.batch import generate_batch

    requests = (engine.request(p, **request_options(args)) for p in prompts)
    done: dict[int, Any] = {}
    printed = failed = 0
    for index, result in generate_batch(engine.runtime, requests):
        done[index] = result
        while printed in done:
            failed += not print_result(prompts[printed], done.pop(printed), args, printed + 1)
            printed += 1
    return failed


def print_result(prompt: str, result, args: argparse.Namespace, number: int) -> bool:
    """One batched answer, or its error (on stderr, and as an error object with --json)."""
    if isinstance(result, FerryError):
        if args.json:
            print(json.dumps({"prompt": prompt, "error": str(result)}, ensure_ascii=False), flush=True)
        print(f"ferry: error: prompt {number}: {result}", file=sys.stderr, flush=True)
        return False
    print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else result.text, flush=True)
    return True


def answer(engine: Engine, prompt: str, args: argparse.Namespace, label: str | None) -> bool:
    """Answer one prompt on stdout. label (a batch): a prompt that fails (longer than --ctx, say)
    gets its own error line on stderr, and with --json an error object in its place, so the
    prompts after it still run; False tells the caller. A setting error concerns every prompt and
    a single prompt has nothing to continue to: both end the run as before."""
    wrote = False
    try:
        if args.json:
            result = engine.generate(prompt, **request_options(args)).to_dict()
            print(json.dumps(result, ensure_ascii=False), flush=True)
            return True
        for token in engine.stream(prompt, **request_options(args)):
            sys.stdout.write(token.text)
            sys.stdout.flush()
            wrote = True
        sys.stdout.write("\n")
        sys.stdout.flush()
        return True
    except SettingError:
        raise
    except FerryError as err:
        if label is None:
            raise
        if wrote:
            sys.stdout.write("\n")
        if args.json:
            print(json.dumps({"prompt": prompt, "error": str(err)}, ensure_ascii=False), flush=True)
        sys.stdout.flush()
        print(f"ferry: error: {label}{err}", file=sys.stderr, flush=True)
        return False


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """Per-request options; sampling (temperature, top_p, seed) is in the configuration."""
    return dict(max_new_tokens=args.max_new_tokens, chat=args.chat, ignore_eos=args.ignore_eos)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts, as text that is valid UTF-8: a bad byte is named by where it came from (the
    flag, the file and line, stdin's line) instead of failing later in the tokenizer."""
    if args.prompt is not None:
        check_text(args.prompt, "-p/--prompt")  # argv bytes Python could not decode are surrogates
        return [args.prompt]
    if getattr(args, "prompt_file", None) is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                data = f.read()
        except OSError as err:
            raise FerryError(f"cannot read --prompt-file: {err}") from None
        return list(parse_prompt_lines(decode_lines(data, args.prompt_file), args.prompt_file))
    if sys.stdin.isatty():
        raise FerryError("no prompt: pass -p TEXT, --prompt-file FILE, or pipe the prompt to stdin")
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:  # replaced by a text stream (tests, embedding)
        text = sys.stdin.read()
        check_text(text, "stdin")
        return [text.rstrip("\n")]
    return ["\n".join(decode_lines(stdin.read(), "stdin")).rstrip("\n")]


def decode_lines(data: bytes, name: str) -> Iterator[str]:
    """UTF-8 lines (without their endings; \\n, \\r\\n and \\r end a line, as text mode reads them)."""
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise FerryError(f"{name}:{number}: not valid UTF-8 (byte {err.start + 1} of the line)") from None


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
        check_text(prompt, f"{name}:{number}: the prompt")  # a "\\ud800" escape decodes to a lone surrogate
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
    if getattr(args, "prompt_file", None) is not None and args.batch_size is None and len(prompts) > 1:
        from ferry.engine.runtime import fitting_batch

        most = min(len(prompts), DEFAULT_BATCH)
        runtime = replace(runtime, batch_size=fitting_batch(replace(config, runtime=runtime), most))
    engine = Engine(replace(config, runtime=runtime), tokenizer=tokenizer)
    plan = engine.plan
    if plan.streamed_layers:
        print(f"ferry: {len(plan.streamed_layers)} of {engine.model.num_layers} layers stream from host "
              f"memory, {fmt_bytes(plan.link_bytes['full_pass'])} per token", file=sys.stderr)
    return engine


def _max_positions(folder: Path) -> int:
    from ferry.offload.checkpoint import read_config

    return read_config(folder)[1].max_position_embeddings


def prompts_ctx(tokenizer: Any, prompts: list[str], args: argparse.Namespace, max_positions: int) -> int:
    from ferry.engine.text import encode_prompt

    lengths = []
    for prompt in prompts:
        try:
            lengths.append(len(encode_prompt(tokenizer, prompt, args.chat)))
        except SettingError:
            raise
        except FerryError:
            if len(prompts) == 1:
                raise
            # this prompt fails again, on its own error line, when its turn comes
    return min(max(lengths, default=1) + max(1, args.max_new_tokens), max_positions)

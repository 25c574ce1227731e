"""The Python API: `ferry.load(**options)` returns an Engine that generates from prompts.

An Engine is a thin wrapper over a `Runtime` (the loaded parts, `ferry.engine.runtime`) and the
generation loop (`ferry.engine.generation.generate`), which can also be used directly. The
model loads once; each generation reuses the KV cache and rope tables, growing them only when a
request needs more context than any before it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from ferry.engine.config import FerryConfig
from ferry.engine.generation import Generation, Request, TokenStream, full_logits, generate
from ferry.engine.runtime import Runtime, build_runtime
from ferry.engine.text import Prompt, check_token_ids, encode_prompt
from ferry.errors import FerryError
from ferry.model.config import ModelConfig
from ferry.offload.planner import Plan

_SAMPLING = ("temperature", "top_p", "seed")


class Engine:
    """A loaded model. `generate` returns a finished Generation, `stream` yields its tokens as
    they are committed; both take per-request options (max_new_tokens, temperature, top_p, seed,
    chat, ignore_eos), the sampling ones defaulting to the configuration's."""

    def __init__(self, config: FerryConfig | None = None, *, tokenizer: Any = None):
        self.config = config or FerryConfig()
        self.runtime: Runtime = build_runtime(self.config, tokenizer)

    @property
    def plan(self) -> Plan:
        return self.runtime.plan

    @property
    def model(self) -> ModelConfig:
        return self.runtime.model

    @property
    def tokenizer(self) -> Any:
        return self.runtime.tokenizer

    def request(self, prompt: Prompt, *, max_new_tokens: int = 256, chat: bool | None = None,
                ignore_eos: bool = False, **sampling: Any) -> Request:
        """A Request with this engine's sampling defaults, any given option replacing them."""
        unknown = set(sampling) - set(_SAMPLING)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in sampling.items() if v is not None}
        return Request(prompt, max_new_tokens, replace(self.config.sampling, **given), chat, ignore_eos)

    def stream(self, prompt: Prompt, **options: Any) -> TokenStream:
        """Tokens as they are produced; the finished Generation is on `.result` afterwards.
        prompt: a text, or a conversation (a list of {"role", "content"} messages, rendered with
        the chat template). Closing the stream early (or leaving the loop) ends the generation
        at that token."""
        return TokenStream(generate(self.runtime, self.request(prompt, **options)))

    def generate(self, prompt: Prompt, **options: Any) -> Generation:
        """Generate to completion; options as for `stream`."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def generate_batch(self, prompts: list[Prompt], *, batch_size: int | None = None,
                       **options: Any) -> list[Generation]:
        """Generations for several prompts, in their order, decoded together: up to `batch_size`
        (default: the engine's batch_size setting) at a time, sharing every weight read, a
        finished one's place taken by the next prompt. Options as for `stream`, for every prompt.
        A prompt refused on its own (longer than the context) raises its FerryError at the end,
        after the others have run."""
        from ferry.engine.batch import generate_batch

        done = dict(generate_batch(self.runtime, [self.request(p, **options) for p in prompts], batch_size))
        results = [done[i] for i in range(len(prompts))]
        for result in results:
            if isinstance(result, FerryError):
                raise result
        return results

    def reset(self) -> None:
        """Forget the previous sequence: the next request prefills its whole prompt."""
        self.runtime.context.forget()

    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids of a prompt as a generation would see them (chat template when it has one)."""
        return encode_prompt(self.runtime.tokenizer, prompt, chat, self.model.vocab_size)

    def logits(self, ids: list[int]):
        """The full model's logits [S, V] at every position of a token sequence; ids outside the
        vocabulary are refused with a FerryError."""
        check_token_ids(ids, self.model.vocab_size)
        return full_logits(self.runtime, ids)

    def close(self) -> None:
        """Stop the link's worker (emulated link); the engine is unusable afterwards."""
        self.runtime.close()


def load(model: str | os.PathLike | None = None, **options: Any) -> Engine:
    """Load a model: a folder, a .gguf file, a hub id, or None for the embedded default.

    options are the settings the CLI's flags set, by the same names (see
    `ferry.engine.config.OPTIONS`): dtype, device, ctx, gpu_memory ("20GiB" or bytes),
    host_memory, prefetch_depth, emulate_link_gbps, schedule, resident_sparse, quant,
    quant_group, quant_fit, sparsity, sparse_method, mode, period (an integer or "auto"),
    max_period, draft_confidence, threshold, accept, speculate, temperature, top_p, seed,
    progress, reuse_prefix, batch_size.
    For example `ferry.load(sparsity=0.5, quant="int4", gpu_memory="20GiB")`.
    """
    tokenizer = options.pop("tokenizer", None)
    return Engine(FerryConfig.from_options(model=model, **options), tokenizer=tokenizer)

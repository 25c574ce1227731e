"""`ferry chat`: a conversation in the terminal.

Every turn sends the whole conversation (rendered with the chat template), and the engine keeps
the KV cache of its previous sequence: the prompt of turn N begins with the sequence of turn N-1,
so only the new user message is prefilled, not the whole history.

Choices, each the simplest that keeps the conversation usable:
- Ctrl-C while an answer streams stops it at the next token; the partial answer stays in the
  conversation (it is on the screen, and its tokens are in the cache). A second Ctrl-C stops at
  once, mid-step, and then the cache is forgotten. Nothing answered: the user message is dropped.
- A message that would take the conversation past the context is refused with one line and
  not kept; /reset starts over. Old turns are not dropped silently: that would change the
  prefix (losing the cache) and what the model remembers without telling the user.
- A line that is not valid UTF-8 (a stray byte, a lone surrogate) is ignored with one line; the
  conversation goes on.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from ferry.cli.flags import add_flags, config_options
from ferry.cli.generate import ENGINE_FLAGS
from ferry.cli.streams import set_errors
from ferry.engine import Engine, FerryConfig, Generation, GenerationStats
from ferry.errors import FerryError

CHAT_FLAGS = ("system", "max_new_tokens", "temperature", "top_p", "seed", "ignore_eos")
PROMPT = "> "
HELP = """\
/reset  forget the conversation and start a new one
/stats  the last answer's statistics
/help   this list
/exit   leave (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while an answer streams stops that answer."""


def add_parser(sub: Any) -> None:
    chat = sub.add_parser("chat", help="talk with a model in the terminal",
                          description="An interactive conversation: answers stream as they are produced, "
                                      "and each turn reuses the KV cache of the conversation so far. "
                                      "Type /help for the commands.")
    add_flags(chat, *ENGINE_FLAGS, *CHAT_FLAGS)
    chat.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    config = FerryConfig.from_options(**config_options(args))
    engine = load_engine(config, args.system)
    history = open_history()
    try:
        Chat(engine, args).loop()
    finally:
        save_history(history)
        engine.close()


def load_engine(config: FerryConfig, system: str | None) -> Engine:
    """The engine, after checking the chat template on the tokenizer alone: a model without one
    (or whose template refuses a system message) fails in a second, not after minutes of loading.
    Without --ctx the plan reserves its default context: a conversation grows, unlike a prompt."""
    from jinja2 import TemplateError

    from ferry.engine.runtime import load_tokenizer
    from ferry.offload.planner import fmt_bytes
    from ferry.offload.sources import resolve_model

    folder = resolve_model(config.runtime.model)
    tokenizer = load_tokenizer(folder)
    if not getattr(tokenizer, "chat_template", None):
        raise FerryError("this model's tokenizer has no chat template, which chat needs (ferry generate "
                         "takes raw prompts)")
    try:
        tokenizer.apply_chat_template(start(system) + [{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    except TemplateError as err:
        raise FerryError(f"this model's chat template refuses the conversation: {err}") from None
    engine = Engine(replace(config, runtime=replace(config.runtime, model=str(folder))), tokenizer=tokenizer)
    plan = engine.plan
    if plan.streamed_layers:
        print(f"ferry: {len(plan.streamed_layers)} of {engine.model.num_layers} layers stream from host "
              f"memory, {fmt_bytes(plan.link_bytes['full_pass'])} per token", file=sys.stderr)
    print(f"ferry chat: {plan.ctx} tokens of context; /help lists the commands, Ctrl-D leaves",
          file=sys.stderr)
    return engine


def start(system: str | None) -> list[dict]:
    """The messages a new conversation begins with."""
    return [{"role": "system", "content": system}] if system else []


@dataclass
class Chat:
    """The conversation and the loop that reads a line, runs a command or answers it."""

    engine: Engine
    args: argparse.Namespace
    messages: list[dict] = field(default_factory=list)
    last: GenerationStats | None = None  # the last answer's; None before one, or after a stopped one

    def __post_init__(self) -> None:
        self.messages = start(self.args.system)

    def loop(self) -> None:
        tolerate_bad_bytes()
        while (line := read_line()) is not None:
            text = line.strip()
            if not text:
                continue
            if not is_utf8(text):
                say("[ignored a line that is not valid UTF-8]")
                continue
            if not text.startswith("/"):
                self.answer(text)
            elif not self.command(text):
                return

    def command(self, text: str) -> bool:
        """Run a /command; False when it leaves."""
        name = text.split()[0]
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.messages, self.last = start(self.args.system), None
            self.engine.reset()
            say("[a new conversation]")
        elif name == "/stats":
            say(stats_line(self.last) if self.last else "[no stats: no answer has finished since the "
                "start, /reset or the last Ctrl-C]")
        elif name == "/help":
            say(HELP)
        else:
            say(f"[unknown command {name}; /help lists them]")
        return True

    def answer(self, text: str) -> None:
        """Stream the answer to one user message and add both to the conversation."""
        self.messages.append({"role": "user", "content": text})
        try:
            stream = self.engine.stream(self.messages, max_new_tokens=self.args.max_new_tokens,
                                        ignore_eos=self.args.ignore_eos)
        except FerryError as err:  # the conversation outgrew the context: the user decides
            self.messages.pop()
            print(f"ferry: {err}; /reset starts a new conversation", file=sys.stderr)
            return
        pieces: list[str] = []
        with stop_requests() as asked:
            try:
                for token in stream:
                    sys.stdout.write(token.text)
                    sys.stdout.flush()
                    pieces.append(token.text)
                    if asked.is_set():
                        break
            except KeyboardInterrupt:  # a second Ctrl-C, mid-step: the cache may hold half a step
                self.engine.reset()
            finally:
                stream.close()
        self.finish("".join(pieces), stream.result)

    def finish(self, text: str, result: Generation | None) -> None:
        """End the answer's line and keep it; a stopped answer has no result (and no stats)."""
        self.last = result.stats if result is not None else None
        if result is None:
            say("\n[stopped]")
        else:
            text = result.text
            say("\n[the context is full: /reset starts a new conversation]"
                if result.stats.finish_reason == "context" else "")
        if text:
            self.messages.append({"role": "assistant", "content": text})
        else:
            self.messages.pop()  # nothing answered: as if the message was never sent


def say(text: str) -> None:
    print(text, flush=True)


def stats_line(s: GenerationStats) -> str:
    """One line of a GenerationStats: what the answer cost and how much of the prompt was reused."""
    parts = [f"{s.new_tokens} new tokens ({s.finish_reason})",
             f"prompt {s.prompt_tokens} tokens, {s.reused_tokens} reused",
             f"prefill {s.prefill_s:.3f} s", f"decode {s.decode_s:.3f} s, {s.tokens_per_s:.1f} tok/s"]
    if s.aal is not None:
        parts.append(f"AAL {s.aal:.2f}")
    return " | ".join(parts)


def read_line() -> str | None:
    """The next line; None to leave (Ctrl-D). Ctrl-C clears the line, as in a shell; a second one
    in a row leaves."""
    interrupted = False
    while True:
        try:
            return input(PROMPT)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            if interrupted:
                print()
                return None
            interrupted = True
            print("\n[Ctrl-C again or Ctrl-D leaves]", flush=True)


def tolerate_bad_bytes() -> None:
    """Undecodable bytes on stdin become lone surrogates (which the loop ignores) rather than a
    UnicodeDecodeError inside input(), which under a strict locale would end the chat."""
    set_errors(sys.stdin, "surrogateescape")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """While an answer streams, Ctrl-C only asks it to stop: the loop ends it at the next token,
    between steps, where the KV cache holds exactly the committed tokens (reusable next turn). A
    second Ctrl-C raises KeyboardInterrupt at once (a long prefill must not trap the user)."""
    asked = threading.Event()  # set: Ctrl-C asked the answer to stop

    def handler(signum: int, frame: Any) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def open_history() -> Path | None:
    """Line editing and a history kept across sessions (ferry's cache folder), when this Python
    has readline; best effort: a history that cannot be read or written is no error."""
    try:
        import readline
    except ImportError:
        return None
    from ferry.offload.sources import cache_dir

    path = cache_dir() / "chat_history"
    readline.set_history_length(1000)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    return path


def save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass

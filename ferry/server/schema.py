"""The OpenAI wire format: request bodies checked and turned into engine calls, and the shapes of
replies, stream chunks and errors.

Parsing is strict about the fields ferry uses (a wrong type is a 400 that names the field, in
OpenAI's error shape, before anything is queued) and silent about the rest, so clients written
for OpenAI that send fields ferry has no use for (`logprobs`, `user`, `presence_penalty`, ...)
still work. `model` is accepted and ignored: the server runs one model.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ferry.engine.text import ROLES, Prompt

DEFAULT_MAX_TOKENS = 256  # when a request gives none; the context limit ends a reply earlier
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}  # ferry's -> OpenAI's


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Call:
    """One request, checked: what the engine runs and how the reply is shaped."""

    kind: str  # "chat" or "completion"
    prompt: Prompt  # a text (completions, never templated) or a conversation (chat)
    options: dict[str, Any]  # keyword arguments of Engine.stream
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat(body: Any) -> Call:
    """POST /v1/chat/completions: `messages` through the model's chat template."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    return _call("chat", [_message(m, i) for i, m in enumerate(messages)], body)


def parse_completion(body: Any) -> Call:
    """POST /v1/completions: a raw `prompt` text (one; a list of one text is accepted too)."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ApiError(400, "prompt must be one text; send one request per prompt", "prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", "prompt")
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    return _call("completion", prompt, body)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _message(m: Any, i: int) -> dict:
    """A message as the chat template takes it; content given as a list of text parts (as newer
    clients send it) is joined into one text."""
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{param} must be an object with role and content", param)
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise ApiError(400, f"{param}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{param}.role")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if not all(isinstance(p, str) for p in parts):
            raise ApiError(400, f"{param}.content: only text parts are supported", f"{param}.content")
        content = "".join(parts)  # type: ignore[arg-type]
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string", f"{param}.content")
    return {"role": role, "content": content}


def _call(kind: str, prompt: Prompt, body: dict) -> Call:
    n = _get(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, "n must be 1: ferry generates one choice per request", "n")
    max_tokens = _get(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _get(body, "temperature", float, None)
    if temperature is not None and not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_p = _get(body, "top_p", float, None)
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = _get(body, "seed", int, None)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError(400, "seed must fit in 64 bits", "seed")
    options = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   ignore_eos=_get(body, "ignore_eos", bool, False), chat=kind == "chat")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return Call(kind, prompt, options, _stops(body.get("stop")), _get(body, "stream", bool, False),
                stream_options.get("include_usage") is True)


def _get(body: dict, name: str, kind: type, default: Any) -> Any:
    """A typed optional field; null means absent. Integers pass as floats; booleans never pass
    as numbers."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        names = {int: "an integer", float: "a number", bool: "a boolean"}
        raise ApiError(400, f"{name} must be {names[kind]}, got {value!r}", name)
    return value


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of them", "stop")
    return tuple(stops)


# --- replies -------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def reply(call: Call, model: str, text: str, finish: str, use: dict, stats: dict | None) -> dict:
    """The whole answer, when the request did not ask for a stream. `ferry` holds the engine's
    GenerationStats (None when a stop string ended the generation early)."""
    if call.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        head = {"id": f"chatcmpl-{call.id}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": text}
        head = {"id": f"cmpl-{call.id}", "object": "text_completion"}
    choice.update(finish_reason=finish, logprobs=None)
    return {**head, "created": call.created, "model": model, "choices": [choice], "usage": use,
            "ferry": stats}


def chunk(call: Call, model: str, text: str | None = None, finish: str | None = None,
          role: bool = False, use: dict | None = None, **extra: Any) -> dict:
    """One server-sent event of a stream: a piece of text, the first chunk of a chat (the
    assistant role), the last (finish_reason), or the usage chunk (no choices)."""
    if call.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        head = {"id": f"chatcmpl-{call.id}", "object": "chat.completion.chunk"}
    else:
        choice = {"index": 0, "text": text or ""}
        head = {"id": f"cmpl-{call.id}", "object": "text_completion"}
    choice.update(finish_reason=finish, logprobs=None)
    body = {**head, "created": call.created, "model": model, "choices": [] if use else [choice]}
    if use:
        body["usage"] = use
    return {**body, **extra}

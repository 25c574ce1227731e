"""Prompt encoding (raw or through the chat template) and incremental detokenization."""

from __future__ import annotations

from numbers import Integral
from typing import Any, Union

from ferry.errors import FerryError, SettingError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, list[Message]]  # a text, or a conversation (always through the chat template)
ROLES = ("system", "user", "assistant", "tool")


def encode_prompt(tokenizer: Any, prompt: Prompt, chat: bool | None, vocab_size: int | None = None) -> list[int]:
    """Token ids for a prompt; chat=None uses the chat template when the tokenizer has one.

    A text is one user message when templated; a list of messages is a conversation and needs
    the template. Raw prompts get exactly the special tokens `tokenizer(prompt)` adds; templated
    ones get only what the template writes.
    """
    conversation = not isinstance(prompt, str)
    if conversation:
        check_messages(prompt)
        for i, m in enumerate(prompt):
            check_text(m["content"], f"message {i}")
    else:
        check_text(prompt, "the prompt")
    if chat is None:
        chat = conversation or bool(getattr(tokenizer, "chat_template", None))
    if chat or conversation:
        if not getattr(tokenizer, "chat_template", None):
            raise SettingError("chat", "is on, but this model's tokenizer has no chat template")
        messages = prompt if conversation else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise FerryError("the prompt is empty")
    if vocab_size is not None:  # a tokenizer with added tokens the model lacks
        check_token_ids(ids, vocab_size)
    return list(ids)


def check_token_ids(ids: Any, vocab_size: int) -> None:
    """Refuse token ids the embedding table cannot look up, before any forward pass: a negative
    id would silently index from the end, one past the table fails deep in torch."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise FerryError(f"token ids must be a list of integers, got {type(ids).__name__}")
    if len(ids) == 0:
        raise FerryError("no token ids: the sequence is empty")
    for i, t in enumerate(ids):
        if not isinstance(t, Integral) or isinstance(t, bool):
            raise FerryError(f"token id {i} is {t!r}, not an integer")
        if not 0 <= t < vocab_size:
            raise FerryError(f"token id {i} is {t}, outside this model's vocabulary (0 to {vocab_size - 1})")


def check_text(text: str, what: str) -> None:
    """Refuse text that is not encodable as UTF-8: a lone surrogate (from a JSON "\\ud800" escape,
    or an argv byte Python could not decode) would otherwise fail deep in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FerryError(f"{what} is not valid text: a lone surrogate or undecodable byte at character "
                         f"{err.start} ({text[err.start]!r})") from None


def check_messages(messages: Any) -> None:
    """A conversation: a non-empty list of {"role", "content"} with known roles and text content."""
    if not isinstance(messages, list) or not messages:
        raise FerryError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise FerryError(f"message {i} needs a role ({', '.join(ROLES)}) and a text content")


class Detokenizer:
    """Turns a growing list of token ids into text pieces that concatenate to the full text.

    Decoding the whole list each time keeps multi-token characters and word-initial spaces right;
    a piece is held back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece

    def flush(self) -> str:
        """Whatever was held back, once no more tokens come."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return piece

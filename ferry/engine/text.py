"""Prompt encoding (raw or through the chat template) and incremental detokenization."""

from __future__ import annotations

from typing import Any

from ferry.errors import FerryError, SettingError


def encode_prompt(tokenizer: Any, prompt: str, chat: bool | None) -> list[int]:
    """Token ids for a prompt; chat=None uses the chat template when the tokenizer has one.

    Raw prompts get exactly the special tokens `tokenizer(prompt)` adds; templated ones get only
    what the template writes.
    """
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SettingError("chat", "is on, but this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise FerryError("the prompt is empty")
    return list(ids)


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

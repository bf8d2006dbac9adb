"""Response bodies as the OpenAI API reference has them: chat.completion and its chunks, text_completion and
its chunks, usage with prompt_tokens_details.cached_tokens."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from rotary_gguf import __version__
from rotary_gguf.runtime import Generation

FINGERPRINT = f"rotary-gguf-{__version__}"


def sse(body: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: JSON` (or a string as it is) and a blank line."""
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


def usage(g: Generation) -> dict[str, Any]:
    completion = len(g.tokens)
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": completion,
            "total_tokens": g.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": g.cached_tokens}}


def finish_reason(g: Generation) -> str:
    """stop: the model ended its turn or a stop sequence came; length: max_tokens or the context ran out. (An
    interrupted generation's client is gone, or the server is shutting down: said as stop.)"""
    return "length" if g.finish_reason == "length" else "stop"


class Reply:
    """The bodies of one request's answer, whole or as stream chunks, under one id and creation time."""

    def __init__(self, endpoint: str, model: str, include_usage: bool = False) -> None:
        self.chat = endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created, self.model, self.include_usage = int(time.time()), model, include_usage
        # A text piece's event is the same bytes around the text each time: made once, then joined per token.
        marker = "\x00piece\x00"
        head, tail = sse(self._chunk({"content": marker}, marker, None)).split(json.dumps(marker).encode())
        self._piece_head, self._piece_tail = head, tail

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def whole(self, text: str, g: Generation) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason(g)}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(g)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(g)}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(g)}

    def _chunk(self, delta: dict[str, Any] | None, text: str | None, reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            body = {**self._head("text_completion"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return body

    def opening(self) -> dict[str, Any] | None:
        """A chat stream's first chunk carries the role (completions have none)."""
        return self._chunk({"role": "assistant", "content": ""}, None, None) if self.chat else None

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, text, None)

    def piece_event(self, text: str) -> bytes:
        """sse(piece(text)), without building and encoding the whole chunk for every token."""
        return self._piece_head + json.dumps(text).encode("utf-8") + self._piece_tail

    def closing(self, g: Generation) -> dict[str, Any]:
        return self._chunk({}, "", finish_reason(g))

    def usage_chunk(self, g: Generation) -> dict[str, Any]:
        """With stream_options.include_usage: a last chunk with no choices and the usage."""
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**head, "choices": [], "usage": usage(g)}

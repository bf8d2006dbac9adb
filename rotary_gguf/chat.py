"""Multi-turn chat over an engine: the GGUF's own chat template, streaming replies, the KV cache reused
across turns, and the oldest turns dropped when the context fills. The terminal loop lives in the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rotary_gguf.errors import RotaryError
from rotary_gguf.runtime import Engine, Generation, Sampling
from rotary_gguf.template import Message


@dataclass(frozen=True)
class Reply:
    text: str
    generation: Generation
    interrupted: bool
    dropped_turns: int


class ChatSession:
    """The conversation and the engine it runs on."""

    def __init__(self, engine: Engine, *, max_reply_tokens: int = 512, temp: float = 0.7, seed: int = 0,
                 system: str | None = None) -> None:
        self.engine = engine
        self.template = engine.chat_template()  # fails now, with one line, if the template is broken
        self.max_reply_tokens, self.temp, self.seed = max_reply_tokens, temp, seed
        self.system = system
        self.messages: list[Message] = []

    def reset(self) -> None:
        self.messages = []
        self.engine.reset()

    def _history(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def _fit(self) -> tuple[list[int], int]:
        """Prompt tokens of the conversation, dropping the oldest turns until there is room for a reply
        (the longest reply, or a quarter of the context if that is less)."""
        n_ctx = self.engine.context_size
        room = min(self.max_reply_tokens, n_ctx // 4)
        dropped = 0
        while True:
            ids = self.engine.tokenize(self.template.render(self._history()))
            if len(ids) + room <= n_ctx or len(self.messages) <= 1:
                break
            del self.messages[:2]  # the oldest user turn and its reply
            dropped += 1
        if len(ids) + 1 > n_ctx:
            self.messages.pop()
            raise RotaryError(f"this message needs {len(ids)} tokens; the context holds {n_ctx} "
                              "(start rotary chat with a larger --ctx)")
        return ids, dropped

    def send(self, text: str, stream: Callable[[str], None]) -> Reply:
        """Add a user turn and stream the reply to `stream`; Ctrl-C ends the reply early and keeps what was
        said so far."""
        self.messages.append({"role": "user", "content": text})
        ids, dropped = self._fit()
        pieces = self.engine.generate(ids, self.max_reply_tokens, sampling=Sampling(temp=self.temp, seed=self.seed),
                                      keep_state=True)
        try:
            for piece in pieces:
                stream(piece)
        except KeyboardInterrupt:  # arrived while the reply was being written out
            pieces.close()
        generation = pieces.result
        self.seed += 1
        self.messages.append({"role": "assistant", "content": generation.text})
        return Reply(generation.text, generation, generation.interrupted, dropped)

"""Multi-turn chat over a loaded model: the GGUF's own chat template, rendered in a Jinja sandbox,
streaming replies, context management and telemetry. The terminal loop lives in the CLI."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from rotary_gguf import runtime
from rotary_gguf.errors import RotaryError
from rotary_gguf.telemetry import Telemetry, sample_telemetry

Message = dict[str, str]


class TemplateError(RotaryError):
    """The model's chat template is missing, malformed or fails to render."""


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template raised: {message}")


RENDER_SECONDS = 2.0  # a chat template renders in milliseconds; one that loops for seconds is hostile


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TemplateError if the block runs longer than `seconds` (main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise TemplateError(f"the chat template did not finish rendering in {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class ChatTemplate:
    """A GGUF chat template compiled in Jinja's immutable sandbox (templates are untrusted input)."""

    source: str
    bos_token: str
    eos_token: str
    _template: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template does not compile: {exc}") from None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            with _time_limit(RENDER_SECONDS):
                return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"the chat template tried something unsafe: {exc}") from None
        except TemplateError:
            raise
        except Exception as exc:  # a template may fail in any way; it must not take the chat down
            raise TemplateError(f"the chat template fails to render: {type(exc).__name__}: {exc}") from None


@dataclass
class Reply:
    text: str
    generation: runtime.Generation
    interrupted: bool
    dropped_turns: int


class ChatSession:
    """The conversation, the model it runs on, and what the last replies cost."""

    def __init__(self, model: runtime.LoadedModel, template: ChatTemplate, *, max_reply_tokens: int = 512,
                 temp: float = 0.7, seed: int = 0, system: str | None = None) -> None:
        self.model, self.template = model, template
        self.max_reply_tokens, self.temp, self.seed = max_reply_tokens, temp, seed
        self.system = system
        self.messages: list[Message] = []
        self.last: runtime.Generation | None = None

    def reset(self) -> None:
        self.messages = []
        self.model.llm.reset()

    def _history(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def _fit(self) -> tuple[list[int], int]:
        """Prompt tokens of the conversation, dropping the oldest turns until there is room for a reply
        (the longest reply, or a quarter of the context if that is less)."""
        n_ctx = runtime.context_size(self.model.llm)
        room = min(self.max_reply_tokens, n_ctx // 4)
        dropped = 0
        while True:
            prompt = self.template.render(self._history())
            ids = self.model.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
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
        """Add a user turn and stream the reply; Ctrl-C (KeyboardInterrupt) ends the reply early and
        keeps what was said so far."""
        self.messages.append({"role": "user", "content": text})
        ids, dropped = self._fit()
        # generate_ids stops at the end of the context by itself
        generation = runtime.generate_ids(self.model.llm, ids, self.max_reply_tokens, temp=self.temp, seed=self.seed,
                                          stream=stream, keep_state=True, residency=self.model.residency)
        self.seed += 1
        self.messages.append({"role": "assistant", "content": generation.text})
        self.last = generation
        return Reply(generation.text, generation, generation.interrupted, dropped)

    def telemetry(self) -> Telemetry:
        return sample_telemetry()


def template_for(model: runtime.LoadedModel, metadata: dict) -> ChatTemplate:
    """The GGUF's chat template, with the model's own BOS/EOS texts."""
    source = metadata.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source.strip():
        raise TemplateError(f"{model.path}: the GGUF has no chat template (tokenizer.chat_template); "
                            "use `rotary run` for plain completion")
    bos, eos = runtime.special_token_texts(model.llm)
    template = ChatTemplate(source, bos, eos)
    # Fail now, with one clear line, rather than at the first message.
    template.render([{"role": "system", "content": "probe"}, {"role": "user", "content": "probe"},
                     {"role": "assistant", "content": "probe"}, {"role": "user", "content": "probe"}])
    return template

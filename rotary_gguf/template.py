"""Chat templates: a GGUF's `tokenizer.chat_template`, compiled and rendered in Jinja's immutable sandbox
(templates are untrusted input), with a time limit against templates that loop."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from rotary_gguf.errors import RotaryError

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


def template_from_metadata(metadata: dict, bos_token: str, eos_token: str, where: object) -> ChatTemplate:
    """The GGUF's chat template with the model's own BOS/EOS texts, checked by rendering a probe
    conversation (so a broken template fails at once, with one clear line, not at the first message)."""
    source = metadata.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source.strip():
        raise TemplateError(f"{where}: the GGUF has no chat template (tokenizer.chat_template); "
                            "use `rotary run` for plain completion")
    template = ChatTemplate(source, bos_token, eos_token)
    template.render([{"role": "system", "content": "probe"}, {"role": "user", "content": "probe"},
                     {"role": "assistant", "content": "probe"}, {"role": "user", "content": "probe"}])
    return template

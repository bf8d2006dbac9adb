"""Generating tokens on a loaded llama.cpp context: a stream of text pieces that can be stopped, the KV
cache reused for the prompt's prefix that is already evaluated, and wall-clock timings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rotary_gguf.errors import RotaryError
from rotary_gguf.rotation import Rotation
from rotary_gguf.runtime.llama import llama_cpp


class ContextError(RotaryError):
    """The prompt does not fit the context."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temp 0, else llama.cpp's top-k / top-p / min-p chain."""

    temp: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """Tokens generated after a prompt, with wall-clock timings."""

    prompt_tokens: int
    tokens: tuple[int, ...]
    text: str
    prompt_seconds: float
    decode_seconds: float
    stopped_at_eos: bool
    interrupted: bool = False  # stopped early (Ctrl-C, or the caller stopped the stream)
    cached_tokens: int = 0  # prompt tokens whose KV state was reused from the previous request

    @property
    def prompt_tokens_per_second(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def context_size(llm: Any) -> int:
    """Tokens the context holds: llama.cpp may round n_ctx up, llama-cpp-python's buffers keep the asked size."""
    return min(llm.n_ctx(), len(llm.input_ids))


def reuse_cache(llm: Any, prompt_ids: list[int], keep_state: bool) -> int:
    """Cut the KV cache back to the longest prefix of the prompt it already holds (at most all but the last
    token, whose logits are needed) and return that prefix's length. Recurrent and hybrid memory cannot
    drop a suffix (llama_memory_seq_rm says so): the cache is then cleared and the prompt evaluated whole."""
    lib = llama_cpp()
    evaluated = llm.input_ids[: llm.n_tokens].tolist()
    reuse = min(common_prefix(prompt_ids, evaluated), len(prompt_ids) - 1) if keep_state else 0
    memory = lib.llama_get_memory(llm.ctx)
    if reuse < llm.n_tokens and not lib.llama_memory_seq_rm(memory, -1, reuse, -1):
        lib.llama_memory_clear(memory, True)
        reuse = 0
    llm.n_tokens = max(reuse, 0)
    return llm.n_tokens


def _complete_utf8(data: bytes) -> tuple[str, bytes]:
    """Split bytes into the decodable text and an incomplete trailing UTF-8 sequence."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""


class Stream:
    """One generation's text pieces (whole UTF-8 characters), decoded as they are iterated.

    `stop()` ends it after the current token; with `interruptible`, Ctrl-C (KeyboardInterrupt) inside the
    decode ends it the same way, and a consumer that catches Ctrl-C itself calls `close()`. Either way the
    KV cache stays consistent and `result` holds what was generated (interrupted=True)."""

    def __init__(self, llm: Any, rotation: Rotation | None, prompt_ids: list[int], max_tokens: int,
                 sampling: Sampling, *, keep_state: bool, ignore_eos: bool, interruptible: bool,
                 on_finish: Callable[[Generation], None] | None = None) -> None:
        n_ctx = context_size(llm)
        if not prompt_ids:
            raise ContextError("the prompt is empty")
        if len(prompt_ids) >= n_ctx:
            raise ContextError(f"the prompt has {len(prompt_ids)} tokens and the context holds {n_ctx}; "
                               "use a larger --ctx or a shorter prompt")
        self._llm, self._rotation, self._ids = llm, rotation, prompt_ids
        self._max_tokens = min(max_tokens, n_ctx - len(prompt_ids))
        self._sampling, self._keep_state, self._ignore_eos = sampling, keep_state, ignore_eos
        self._interruptible, self._on_finish = interruptible, on_finish
        self.tokens: list[int] = []
        self._cached = 0
        self._prompt_seconds = self._decode_seconds = 0.0
        self._eos = self._stopping = self._interrupted = self._done = self._reported = False
        self._run = self._generate()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._run)
        except BaseException:
            self._report()
            raise

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        """End the generation now (from outside an iteration step)."""
        if not self._done:
            self._interrupted = True
        self._run.close()
        self._report()

    def _report(self) -> None:
        if self._on_finish and not self._reported:
            self._reported = True
            self._on_finish(self.result)

    def drain(self) -> Generation:
        for _ in self:
            pass
        return self.result

    @property
    def result(self) -> Generation:
        text = self._llm.detokenize(self.tokens).decode("utf-8", errors="replace")
        return Generation(len(self._ids), tuple(self.tokens), text, self._prompt_seconds, self._decode_seconds,
                          self._eos, self._interrupted, self._cached)

    def _generate(self) -> Iterator[str]:
        llm, rotation, s = self._llm, self._rotation, self._sampling
        self._cached = reuse_cache(llm, self._ids, self._keep_state)
        llm.set_seed(s.seed)
        vocab = llama_cpp().llama_model_get_vocab(llm.model)
        started = time.perf_counter()
        try:
            if rotation:
                rotation.before_prompt()
            llm.eval(self._ids[llm.n_tokens:])
            if rotation:
                rotation.after_prompt()
        except KeyboardInterrupt:
            if not self._interruptible:
                raise
            self._interrupted = self._done = True  # llm.eval drops KV cells past n_tokens on its next call
            return
        finally:
            self._prompt_seconds = time.perf_counter() - started
        started = time.perf_counter()
        pending = b""
        try:
            while len(self.tokens) < self._max_tokens and not self._stopping:
                token = llm.sample(temp=s.temp, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, repeat_penalty=1.0)
                if not self._ignore_eos and llama_cpp().llama_vocab_is_eog(vocab, token):
                    self._eos = True
                    break
                self.tokens.append(token)
                pending += llm.detokenize([token], prev_tokens=self.tokens[:-1])
                text, pending = _complete_utf8(pending)
                self._decode_seconds = time.perf_counter() - started
                if text:
                    yield text
                started = time.perf_counter() - self._decode_seconds
                llm.eval([token])
                if rotation:
                    rotation.after_token()
            self._interrupted = self._stopping
        except KeyboardInterrupt:
            if not self._interruptible:
                raise
            self._interrupted = True
        finally:
            self._decode_seconds = time.perf_counter() - started
            self._done = True

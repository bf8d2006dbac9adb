"""Generating tokens on a loaded llama.cpp context: a stream of text pieces that can be stopped, the KV
cache reused for the prompt's prefix that is already evaluated, and wall-clock timings; stop strings, and
llama.cpp grammars (GBNF, JSON schemas) that constrain which tokens may come."""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rotary_gguf.errors import RotaryError
from rotary_gguf.rotation import Rotation
from rotary_gguf.runtime.llama import captured_log, last_line, llama_cpp


class ContextError(RotaryError):
    """The prompt does not fit the context."""


class DecodeError(RotaryError):
    """llama.cpp failed to evaluate a batch."""


class GrammarError(RotaryError):
    """A grammar (or the JSON schema it comes from) that llama.cpp cannot use."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temp 0, else llama.cpp's top-k / top-p / min-p chain."""

    temp: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0
    grammar: str | None = None  # GBNF (llama.cpp's grammar format): only tokens it allows are sampled


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
    stop_text: str | None = None  # the stop string that ended the generation (not in text)

    @property
    def finish_reason(self) -> str:
        """stop (end of generation token or a stop string), length (max_tokens or the context ran out), or
        interrupted."""
        if self.stopped_at_eos or self.stop_text is not None:
            return "stop"
        return "interrupted" if self.interrupted else "length"

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


def can_trim(llm: Any) -> bool:
    """Whether llama.cpp can drop the end of this model's memory: not for recurrent or hybrid memory
    (qwen35moe's Gated DeltaNet layers, Mamba-style state), nor for a sliding-window KV cache that is not
    full-size (its cells for old positions may be gone; llama.cpp's default, and ours, is full-size)."""
    lib = llama_cpp()
    swa_pruned = lib.llama_model_n_swa(llm.model) > 0 and not llm.context_params.swa_full
    return not (lib.llama_model_is_recurrent(llm.model) or lib.llama_model_is_hybrid(llm.model) or swa_pruned)


PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY (llama.h): the recurrent / SWA part of a sequence's state
SEQ = 0  # the one sequence llama-cpp-python evaluates (recurrent memory refuses partial removals for seq -1)


class PromptCache:
    """What of a new prompt the context already holds, and how to get back to it.

    Memory that can drop a suffix is cut back to the longest common prefix. Memory that cannot (can_trim)
    keeps a checkpoint of its recurrent state taken when a prompt was evaluated (llama.cpp's
    `llama_state_seq_*` with PARTIAL_ONLY, as llama-server's context checkpoints): a later prompt that
    starts with that prompt restores it and evaluates only the rest (a conversation's next turn); anything
    else clears the memory and evaluates the prompt whole."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._trim = can_trim(llm)
        self._checkpoint: tuple[list[int], ctypes.Array] | None = None  # (the tokens it holds, state bytes)

    def reuse(self, prompt_ids: list[int], keep_state: bool) -> int:
        """Set the context up for prompt_ids; returns how many of its tokens need no evaluation (at most
        all but the last, whose logits are needed)."""
        llm, lib = self.llm, llama_cpp()
        evaluated = llm.input_ids[: llm.n_tokens].tolist()
        reuse = min(common_prefix(prompt_ids, evaluated), len(prompt_ids) - 1) if keep_state else 0
        memory = lib.llama_get_memory(llm.ctx)
        if reuse < llm.n_tokens:
            if reuse and not self._trim:
                reuse = self._restore(prompt_ids[:reuse])
            elif not lib.llama_memory_seq_rm(memory, SEQ, reuse, -1):
                reuse = 0
            if reuse == 0:
                lib.llama_memory_clear(memory, True)
        llm.n_tokens = reuse
        return reuse

    def _restore(self, prefix: list[int]) -> int:
        """The checkpoint's token count once restored (the memory then ends there), or 0 when it is not a
        prefix of `prefix` or llama.cpp refuses it."""
        if self._checkpoint is None or prefix[: len(self._checkpoint[0])] != self._checkpoint[0]:
            return 0
        lib, (tokens, state) = llama_cpp(), self._checkpoint
        restored = lib.llama_state_seq_set_data_ext(self.llm.ctx, state, len(state), SEQ, PARTIAL_ONLY)
        if not restored or not lib.llama_memory_seq_rm(lib.llama_get_memory(self.llm.ctx), SEQ, len(tokens), -1):
            return 0
        return len(tokens)

    def checkpoint(self) -> None:
        """After a prompt was evaluated: remember the state a next turn can start from (cannot-trim memory)."""
        if self._trim:
            return
        lib, ctx = llama_cpp(), self.llm.ctx
        size = lib.llama_state_seq_get_size_ext(ctx, SEQ, PARTIAL_ONLY)
        state = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data_ext(ctx, state, size, SEQ, PARTIAL_ONLY) == size:
            self._checkpoint = (self.llm.input_ids[: self.llm.n_tokens].tolist(), state)

    def clear(self) -> None:
        self._checkpoint = None


def evaluate(llm: Any, ids: list[int]) -> None:
    """llm.eval, with a failed llama_decode as one clear error."""
    try:
        llm.eval(ids)
    except RuntimeError as exc:  # llama-cpp-python: "llama_decode returned -1"
        raise DecodeError(f"llama.cpp could not evaluate {len(ids)} token(s) after {llm.n_tokens}: {exc}") from None


def evaluate_logits(llm: Any, ids: list[int], first: int) -> np.ndarray:
    """Evaluate ids from an empty memory in batches of n_batch, asking llama.cpp for the logits of positions
    first.. only (as its perplexity tool does); returns them as float32 rows (len(ids) - first, n_vocab).
    llm.eval cannot: it keeps every position's logits or only the last."""
    lib, n_vocab = llama_cpp(), llm.n_vocab()
    out = np.empty((len(ids) - first, n_vocab), dtype=np.float32)
    batch = lib.llama_batch_init(llm.n_batch, 0, 1)
    try:
        for start in range(0, len(ids), llm.n_batch):
            chunk = ids[start: start + llm.n_batch]
            batch.n_tokens = len(chunk)
            for k, token in enumerate(chunk):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, start + k, 1
                batch.seq_id[k][0], batch.logits[k] = SEQ, start + k >= first
            if (status := lib.llama_decode(llm.ctx, batch)) != 0:
                raise DecodeError(f"llama.cpp could not evaluate {len(chunk)} token(s) after {start}: "
                                  f"llama_decode returned {status}")
            rows = start + len(chunk) - max(first, start)
            if rows > 0:
                logits = np.ctypeslib.as_array(lib.llama_get_logits(llm.ctx), shape=(rows * n_vocab,))
                out[max(first, start) - first: start + len(chunk) - first] = logits.reshape(rows, n_vocab)
            llm.input_ids[start: start + len(chunk)] = chunk
            llm.n_tokens = start + len(chunk)
    finally:
        lib.llama_batch_free(batch)
    return out


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """GBNF for JSON output: any JSON object (schema None or {}), or a value valid against a JSON schema
    (llama-cpp-python's converter, llama.cpp's json-schema-to-grammar)."""
    grammar = llama_cpp().llama_grammar
    if not schema:
        return grammar.JSON_GBNF
    try:
        return grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises whatever it meets (KeyError, ValueError, RecursionError, ...)
        raise GrammarError(f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: {exc}") from None


def check_grammar(llm: Any, grammar: str) -> None:
    """Raise GrammarError unless llama.cpp parses the grammar (a grammar it refuses must never reach a sampler
    chain: llama-cpp-python would add a null sampler)."""
    lib = llama_cpp()
    with captured_log() as lines:
        sampler = lib.llama_sampler_init_grammar(lib.llama_model_get_vocab(llm.model), grammar.encode("utf-8"),
                                                 b"root")
    if not sampler:
        raise GrammarError(f"llama.cpp cannot parse the grammar: {last_line(lines)}")
    lib.llama_sampler_free(sampler)


class _StopScan:
    """Text pieces in, text out, up to the first stop string: what could still be the start of a stop string
    is held back until the next piece decides."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = self.emitted = ""
        self.found: str | None = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        held = self.held + text
        hits = [(i, stop) for stop in self.stops if (i := held.find(stop)) >= 0]
        if hits:
            cut, self.found = min(hits)
            out, self.held = held[:cut], ""
        else:
            keep = next((k for k in range(min(len(held), max(map(len, self.stops)) - 1), 0, -1)
                         if any(stop.startswith(held[-k:]) for stop in self.stops)), 0)
            out, self.held = held[: len(held) - keep], held[len(held) - keep:]
        self.emitted += out
        return out

    def flush(self) -> str:
        """At the end with no stop string found: the text held back."""
        out, self.held = self.held, ""
        self.emitted += out
        return out


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
    KV cache stays consistent and `result` holds what was generated (interrupted=True).

    `stop` strings end it when the text contains one: the text before it is yielded, the stop string and
    anything after it are not (result.stop_text names it). A grammar in `sampling` is checked here
    (GrammarError) and constrains every sampled token."""

    def __init__(self, llm: Any, rotation: Rotation | None, prompt_ids: list[int], max_tokens: int,
                 sampling: Sampling, *, keep_state: bool, ignore_eos: bool, interruptible: bool,
                 on_finish: Callable[[Generation], None] | None = None, cache: PromptCache | None = None,
                 stop: Sequence[str] = ()) -> None:
        n_ctx = context_size(llm)
        if not prompt_ids:
            raise ContextError("the prompt is empty")
        if len(prompt_ids) >= n_ctx:
            raise ContextError(f"the prompt has {len(prompt_ids)} tokens and the context holds {n_ctx}; "
                               "use a larger --ctx or a shorter prompt")
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        if sampling.grammar is not None:
            check_grammar(llm, sampling.grammar)
        self._scan = _StopScan(stop)
        self._llm, self._rotation, self._ids = llm, rotation, prompt_ids
        self._max_tokens = min(max_tokens, n_ctx - len(prompt_ids))
        self._sampling, self._keep_state, self._ignore_eos = sampling, keep_state, ignore_eos
        self._interruptible, self._on_finish = interruptible, on_finish
        self._cache = cache or PromptCache(llm)
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
        found = self._scan.found
        text = self._scan.emitted if found is not None else \
            self._llm.detokenize(self.tokens).decode("utf-8", errors="replace")
        return Generation(len(self._ids), tuple(self.tokens), text, self._prompt_seconds, self._decode_seconds,
                          self._eos, self._interrupted, self._cached, found)

    def _sampler(self) -> tuple[Callable[[], int], Callable[[], None]]:
        """sample() -> the next token, and what frees the sampler. Without a grammar, llama-cpp-python's own
        per-token chain (as before); with one, the same chain plus the grammar, kept for the whole generation
        (the grammar's state follows the accepted tokens)."""
        llm, s = self._llm, self._sampling
        if s.grammar is None:
            return (lambda: llm.sample(temp=s.temp, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, repeat_penalty=1.0),
                    lambda: None)
        lib = llama_cpp()
        chain = llm._init_sampler(temp=s.temp, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, repeat_penalty=1.0,
                                  grammar=lib.llama_grammar.LlamaGrammar.from_string(s.grammar))
        return lambda: lib.llama_sampler_sample(chain.sampler, llm.ctx, -1), chain.close

    def _generate(self) -> Iterator[str]:
        llm, rotation, s = self._llm, self._rotation, self._sampling
        self._cached = self._cache.reuse(self._ids, self._keep_state)
        llm.set_seed(s.seed)
        vocab = llama_cpp().llama_model_get_vocab(llm.model)
        started = time.perf_counter()
        try:
            if rotation:
                rotation.before_prompt()
            evaluate(llm, self._ids[llm.n_tokens:])
            self._cache.checkpoint()
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
        sample, free_sampler = self._sampler()
        try:
            while len(self.tokens) < self._max_tokens and not self._stopping:
                token = sample()
                if not self._ignore_eos and llama_cpp().llama_vocab_is_eog(vocab, token):
                    self._eos = True
                    break
                self.tokens.append(token)
                pending += llm.detokenize([token], prev_tokens=self.tokens[:-1])
                text, pending = _complete_utf8(pending)
                text = self._scan.feed(text)
                self._decode_seconds = time.perf_counter() - started
                if text:
                    yield text
                started = time.perf_counter() - self._decode_seconds
                if self._scan.found is not None:
                    break  # the stop string's last token needs no evaluation, like an end of generation token
                evaluate(llm, [token])
                if rotation:
                    rotation.after_token()
            self._interrupted = self._stopping and self._scan.found is None
            if self._scan.found is None and (rest := self._scan.flush()):
                yield rest
        except KeyboardInterrupt:
            if not self._interruptible:
                raise
            self._interrupted = True
        finally:
            free_sampler()
            self._decode_seconds = time.perf_counter() - started
            self._done = True

"""Perplexity of a model over a text, computed as llama.cpp's perplexity tool computes it.

`L/` is the llama.cpp tree vendored in llama-cpp-python 0.3.36; the tool is
`L/tools/perplexity/perplexity.cpp`. The text is tokenized whole, BOS first when the vocabulary adds one
(`common_tokenize(ctx, text, true)`, :473). Two modes:

- windows (`perplexity`, :442-652): windows of ctx tokens one after another, each evaluated from an empty
  cache with its first token replaced by BOS when the vocabulary adds one (:565-569); the logits at
  positions ctx/2 .. ctx-2 score the next token (:540, :608-621), ctx - ctx/2 - 1 tokens per window.
- stride (`perplexity_v2`, :296-440, llama.cpp's --ppl-stride): windows of ctx tokens starting every
  `stride` tokens while start + ctx < len(tokens) (:342); the logits at positions ctx-stride-1 .. ctx-2
  score the last `stride` tokens of each window (:417), so every token after the first ctx - stride is
  scored exactly once. No token is replaced: llama.cpp's BOS substitution there (:389-392) happens after
  the decode and is undone at once. llama.cpp widens its context by stride/2 in this mode (:2017-2021):
  our ctx is the window itself, so `--ppl-stride S -c C` is our `--stride S --ctx C + S/2`.

Perplexity is exp(mean NLL) over every scored token; its standard error is llama.cpp's (:640-647):
sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)) * PPL, which the stride mode of llama.cpp does not print.
Unlike llama.cpp (which wants 2 * ctx tokens, :478), a text of ctx tokens is enough for one window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rotary_gguf.errors import RotaryError
from rotary_gguf.runtime import Engine

DEFAULT_CTX = 512  # llama.cpp's perplexity default (its common params' n_ctx)
MIN_CTX = 16  # the smallest --ctx the command line takes
_ROWS = 64  # logit rows per float64 log-softmax: 64 x n_vocab doubles at a time, not the whole window


class PerplexityError(RotaryError):
    """A text, context or stride perplexity cannot be measured with."""


@dataclass(frozen=True)
class Perplexity:
    """The result of one perplexity run."""

    n_ctx: int
    stride: int | None  # None: llama.cpp's default mode (score each window's second half)
    tokens: int  # in the text, BOS included
    windows: int
    scored: int  # tokens whose NLL is counted
    nll: float  # mean negative log-likelihood (nats)
    nll_sq: float  # mean of its square
    seconds: float  # evaluating and scoring the windows

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def ppl_stderr(self) -> float | None:
        """llama.cpp's standard error of the estimate (None with fewer than two scored tokens)."""
        variance = self.nll_sq - self.nll * self.nll
        if self.scored < 2 or variance <= 0:
            return None
        return math.sqrt(variance / (self.scored - 1)) * self.ppl

    @property
    def tokens_per_second(self) -> float:
        """Tokens evaluated (every window's ctx tokens) per second."""
        return self.windows * self.n_ctx / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "stride": self.stride, "tokens": self.tokens, "windows": self.windows,
                "scored_tokens": self.scored, "nll": self.nll, "ppl": self.ppl, "ppl_stderr": self.ppl_stderr,
                "tokens_per_second": self.tokens_per_second, "seconds": self.seconds}


def default_ctx(n_ctx_train: int) -> int:
    """llama.cpp's 512, never beyond the model's training context (0: unknown)."""
    return min(DEFAULT_CTX, n_ctx_train) if n_ctx_train > 0 else DEFAULT_CTX


def read_text(path: Path) -> str:
    """The text of a file (UTF-8), with a PerplexityError naming the file when it cannot be used."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PerplexityError(f"{path}: no such file") from None
    except OSError as exc:
        raise PerplexityError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PerplexityError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not text:
        raise PerplexityError(f"{path}: the file is empty")
    return text


def check_stride(ctx: int, stride: int | None) -> None:
    """A stride scores the last `stride` tokens of a window after at least one token of context."""
    if stride is not None and not 0 < stride < ctx:
        raise PerplexityError(f"stride {stride} must be between 1 and ctx - 1 ({ctx - 1})")


def windows(n_tokens: int, ctx: int, stride: int | None = None, source: str = "the text") -> tuple[range, int]:
    """The start of each window, and the first logit position scored in every window (perplexity.cpp :342,
    :417, :486, :540); PerplexityError when there is no window."""
    check_stride(ctx, stride)
    needed = ctx if stride is None else ctx + 1  # stride mode: a window must end before the last token
    if n_tokens < needed:
        largest = n_tokens - (needed - ctx)
        hint = f"use --ctx {largest} or less, or a longer text" if largest >= MIN_CTX else "use a longer text"
        mode = "" if stride is None else f" with stride {stride}"
        raise PerplexityError(f"{source} has {n_tokens} tokens; ctx {ctx}{mode} needs at least {needed}; {hint}")
    if stride is None:
        return range(0, n_tokens // ctx * ctx, ctx), ctx // 2
    return range(0, n_tokens - ctx, stride), ctx - stride - 1


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, in float64, _ROWS rows at a time."""
    out = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), _ROWS):
        rows = logits[i: i + _ROWS].astype(np.float64)
        rows -= rows.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(rows).sum(axis=1))
        out[i: i + _ROWS] = log_sum - rows[np.arange(len(rows)), targets[i: i + _ROWS]]
    return out


def perplexity(engine: Engine, ids: list[int], ctx: int, stride: int | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> Perplexity:
    """Perplexity of the token ids (BOS included, as `Engine.tokenize(text, add_bos=True, special=False)`
    gives them) in windows of ctx tokens; `stride` selects llama.cpp's --ppl-stride mode. progress(done,
    total, running estimate) after each window."""
    if ctx > engine.context_size:
        raise PerplexityError(f"ctx {ctx} is larger than the engine's context ({engine.context_size})")
    starts, first = windows(len(ids), ctx, stride)
    bos = engine.added_bos() if stride is None else None
    tokens = np.asarray(ids, dtype=np.int64)
    total = total_sq = 0.0
    scored = 0
    started = time.perf_counter()
    for done, start in enumerate(starts, 1):
        window = tokens[start: start + ctx].tolist()
        if bos is not None:
            window[0] = bos
        logits = engine.evaluate_logits(window, first)  # positions first..ctx-1, as llama.cpp asks; the last unused
        nll = token_nll(logits[:-1], tokens[start + first + 1: start + ctx])
        total, total_sq, scored = total + nll.sum(), total_sq + (nll * nll).sum(), scored + len(nll)
        if progress is not None:
            progress(done, len(starts), f"PPL {math.exp(total / scored):.4f}")
    return Perplexity(ctx, stride, len(ids), len(starts), scored, float(total / scored), float(total_sq / scored),
                      time.perf_counter() - started)


def text_perplexity(engine: Engine, text: str, ctx: int, stride: int | None = None,
                    progress: Callable[[int, int, str], None] | None = None, source: str = "the text") -> Perplexity:
    """perplexity() of a text, tokenized as llama.cpp's perplexity tool tokenizes it; `source` names the
    text in errors."""
    ids = engine.tokenize(text, add_bos=True, special=False)
    windows(len(ids), ctx, stride, source)
    return perplexity(engine, ids, ctx, stride, progress)


def format_perplexity(result: Perplexity) -> str:
    """The summary, ending with llama.cpp's "Final estimate" line."""
    mode = f"stride {result.stride}" if result.stride else "second halves scored"
    lines = [f"{result.tokens} tokens, {result.windows} windows of {result.n_ctx} ({mode}), "
             f"{result.scored} tokens scored, {result.tokens_per_second:.1f} tok/s, {result.seconds:.1f} s"]
    error = result.ppl_stderr
    lines.append(f"Final estimate: PPL = {result.ppl:.4f}" + (f" +/- {error:.5f}" if error is not None else ""))
    return "\n".join(lines)

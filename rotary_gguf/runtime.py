"""The llama.cpp runtime: the only module that imports llama_cpp.

For now it loads a GGUF on the CPU and generates tokens; placement overrides and the scheduler
plugin attach here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from rotary_gguf.errors import RuntimeLoadError


@dataclass(frozen=True)
class Generation:
    """Tokens generated greedily after a prompt, with llama.cpp's wall-clock timings."""

    prompt_tokens: int
    tokens: tuple[int, ...]
    text: str
    prompt_seconds: float
    decode_seconds: float
    stopped_at_eos: bool

    @property
    def decode_tokens_per_second(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def default_threads() -> int:
    """Physical cores (llama.cpp's own default counts logical ones, which hurts on SMT machines)."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def load(path: str | os.PathLike[str], *, n_ctx: int = 512, n_threads: int | None = None, seed: int = 0):
    """Load a GGUF with llama-cpp-python (CPU or whatever build is installed); returns a llama_cpp.Llama."""
    import llama_cpp

    path = Path(path)
    threads = n_threads or default_threads()
    try:
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            seed=seed, verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise RuntimeLoadError(f"{path}: llama.cpp could not load the model ({exc})") from None


def generate(llm, prompt: str, max_tokens: int) -> Generation:
    """Greedy decode of up to max_tokens after prompt; stops early at the model's end-of-generation token."""
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt_ids)
    prompt_seconds = time.perf_counter() - started
    tokens: list[int] = []
    stopped = False
    started = time.perf_counter()
    while len(tokens) < max_tokens:
        token = llm.sample(temp=0.0)
        if llm.token_eos() == token or _is_end_of_generation(llm, token):
            stopped = True
            break
        tokens.append(token)
        llm.eval([token])
    decode_seconds = time.perf_counter() - started
    text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    return Generation(len(prompt_ids), tuple(tokens), text, prompt_seconds, decode_seconds, stopped)


def _is_end_of_generation(llm, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def last_logits(llm):
    """Logits of the last evaluated token, read from llama.cpp (llama-cpp-python keeps them only with
    logits_all)."""
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

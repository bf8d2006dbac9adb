#!/usr/bin/env python3
"""Wrapper overhead: rotary's runtime against plain llama-cpp-python, same model, same placement.

Both load the model with llama.cpp's defaults on this machine (plain llama-cpp-python cannot set tensor
overrides) and decode greedily with the same sampler settings; runs alternate so that machine noise hits
both alike. Prints decode tok/s of each and the ratio rotary / plain (1.0 = no overhead).

    .venv/bin/python scripts/bench_overhead.py [MODEL.gguf] [--rounds 10] [--tokens 256]

Without MODEL it uses the `small` synth model from the demo cache (writing it first if needed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import llama_cpp

from rotary_gguf import runtime
from rotary_gguf.demo import DEMO_PROMPT, cached_synth_model


def plain_decode(llm: llama_cpp.Llama, prompt_ids: list[int], n_tokens: int) -> float:
    """The loop a llama-cpp-python user writes: eval the prompt, then sample and eval token by token."""
    llm.reset()
    llm.eval(prompt_ids)
    started = time.perf_counter()
    for _ in range(n_tokens):
        token = llm.sample(temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)
        llm.eval([token])
    return n_tokens / (time.perf_counter() - started)


def rotary_decode(llm: llama_cpp.Llama, prompt_ids: list[int], n_tokens: int) -> float:
    return runtime.generate_ids(llm, prompt_ids, n_tokens, ignore_eos=True).decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    path = args.model or cached_synth_model("small")[0]
    threads = runtime.default_threads()
    plain = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                            verbose=False)
    ours = runtime.load(path, n_ctx=1024, n_threads=threads).llm
    prompt_ids = plain.tokenize(DEMO_PROMPT.encode(), add_bos=False, special=True)
    results: dict[str, list[float]] = {"plain": [], "rotary": []}
    runs = {"plain": lambda: plain_decode(plain, prompt_ids, args.tokens),
            "rotary": lambda: rotary_decode(ours, prompt_ids, args.tokens)}
    for round_ in range(args.rounds):
        order = ("plain", "rotary") if round_ % 2 == 0 else ("rotary", "plain")  # neither always goes first
        for name in order:
            results[name].append(runs[name]())
    for name, values in results.items():
        print(f"{name:<8} decode {statistics.median(values):7.1f} tok/s (median of {args.rounds}: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")
    ratio = statistics.median(results["rotary"]) / statistics.median(results["plain"])
    print(f"ratio rotary / plain llama-cpp-python: {ratio:.3f} ({path.name}, {threads} threads)")


if __name__ == "__main__":
    main()

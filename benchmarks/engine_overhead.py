#!/usr/bin/env python3
"""Engine overhead: `rotary run`'s decode loop (rotary_gguf.runtime.Engine) against plain llama-cpp-python,
same model, same placement, same sampler, in one process.

Plain llama-cpp-python cannot set tensor overrides, so both run llama.cpp's default CPU placement: the
engine with the cpu-only profile and --repack (llama.cpp's own CPU buffers, as plain Llama() loads them).
Runs alternate so that machine noise hits both alike. Prints decode tok/s medians, their spread, and the
ratio engine / plain (1.0 = no overhead).

    .venv/bin/python benchmarks/engine_overhead.py [MODEL.gguf] [--rounds 10] [--tokens 256]

Without MODEL it uses the `small` synth model from the demo cache (writing it first if needed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import llama_cpp

from rotary_gguf.demo import DEMO_PROMPT, cached_synth_model
from rotary_gguf.runtime import Engine, EngineOptions, default_threads


def plain_decode(llm: llama_cpp.Llama, prompt_ids: list[int], n_tokens: int) -> float:
    """The loop a llama-cpp-python user writes: eval the prompt, then sample and eval token by token."""
    llm.reset()
    llm.eval(prompt_ids)
    started = time.perf_counter()
    for _ in range(n_tokens):
        token = llm.sample(temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)
        llm.eval([token])
    return n_tokens / (time.perf_counter() - started)


def engine_decode(engine: Engine, prompt_ids: list[int], n_tokens: int) -> float:
    """What `rotary run` does: stream the generation's text pieces."""
    stream = engine.generate(prompt_ids, n_tokens, ignore_eos=True)
    for _ in stream:
        pass
    return stream.result.decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    path = args.model or cached_synth_model("small")[0]
    threads = default_threads()
    engine = Engine.open(path, "cpu-only", "experts-on-host", EngineOptions(ctx=1024, threads=threads, repack=True))
    plain = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                            n_batch=engine.options.batch, n_ubatch=engine.options.ubatch,
                            flash_attn=engine.options.flash_attention, verbose=False)
    prompt_ids = engine.tokenize(DEMO_PROMPT)
    results: dict[str, list[float]] = {"plain": [], "engine": []}
    runs = {"plain": lambda: plain_decode(plain, prompt_ids, args.tokens),
            "engine": lambda: engine_decode(engine, prompt_ids, args.tokens)}
    for round_ in range(args.rounds):
        order = ("plain", "engine") if round_ % 2 == 0 else ("engine", "plain")  # neither always goes first
        for name in order:
            results[name].append(runs[name]())
    for name, values in results.items():
        print(f"{name:<8} decode {statistics.median(values):7.1f} tok/s (median of {args.rounds}; sd "
              f"{statistics.stdev(values):.1f}: " + ", ".join(f"{v:.1f}" for v in values) + ")")
    ratio = statistics.median(results["engine"]) / statistics.median(results["plain"])
    print(f"ratio engine / plain llama-cpp-python: {ratio:.3f} ({path.name}, {threads} threads, "
          f"{args.tokens} tokens x {args.rounds} rounds)")
    engine.close()
    plain.close()


if __name__ == "__main__":
    main()

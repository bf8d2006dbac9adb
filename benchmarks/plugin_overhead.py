#!/usr/bin/env python3
"""Scheduler plugin overhead on the CPU, and llama.cpp's CPU repacking, in one process.

Variants, all with every routed expert in host memory (llama.cpp's --cpu-moe) on the same model, each an
engine of its own, all loaded at once (each keeps its own plugin state):
  zero-copy   experts read from the mmap, no plugin (rotary's experts-on-host placement)
  repacked    llama.cpp copies the experts into its CPU repacking buffers (--repack)
  plugin-0    the rotary plugin claims the expert FFN with 0 slots (CPU stand-in device): pure overhead
  plugin-all  every expert resident in the stand-in's slots (the device path, run on a second CPU backend)
  calibrating what `rotary calibrate` runs: the plugin records every token's routing, no slots
The order of the variants rotates every round so machine noise hits all alike. Prints decode tok/s
medians and ratios against zero-copy.

    .venv/bin/python benchmarks/plugin_overhead.py [MODEL.gguf] [--rounds 6] [--tokens 128] [--threads N]

Without MODEL it uses the `small` synth model (Q4_K) from the demo cache, writing it first if needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from rotary_gguf.demo import cached_synth_model
from rotary_gguf.runtime import Engine, EngineOptions, default_threads

os.environ["ROTARY_SCHED_DEVICE"] = "cpu"
PROMPT = list(range(100, 164))


def decode(engine: Engine, tokens: int) -> float:
    return engine.complete(PROMPT, tokens, ignore_eos=True).decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    path = args.model or cached_synth_model("small")[0]
    base = EngineOptions(ctx=512, threads=args.threads)
    engines = {
        "zero-copy": Engine.open(path, "cpu-only", "experts-on-host", base),
        "repacked": Engine.open(path, "cpu-only", "experts-on-host", EngineOptions(ctx=512, threads=args.threads,
                                                                                  repack=True)),
        "plugin-0": Engine.open(path, "cpu-only", "rotary", base),
        # The H100 profile's budget holds every expert of a small model in the stand-in's slots.
        "plugin-all": Engine.open(path, "h100-80gb", "rotary", base),
        "calibrating": Engine.open(path, "cpu-only", "rotary", EngineOptions(ctx=512, threads=args.threads,
                                                                             routing_only=True)),
    }
    engines["calibrating"].rotation.watch(lambda phase, routing: None)
    names = list(engines)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            results[name].append(decode(engines[name], args.tokens))
    base_rate = statistics.median(results["zero-copy"])
    p = engines["zero-copy"].index.params
    print(f"{path.name}: {p.n_layer} layers, {p.n_expert} experts ({p.n_expert_used} used), {args.threads} threads, "
          f"{args.tokens} tokens x {args.rounds} rounds")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<11} decode {median:7.1f} tok/s  ratio {median / base_rate:.3f}  ("
              + ", ".join(f"{v:.0f}" for v in values) + ")")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()

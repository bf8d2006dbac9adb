#!/usr/bin/env python3
"""Scheduler plugin overhead on the CPU, and llama.cpp's CPU repacking, in one process.

Variants, all with every routed expert in host memory (llama.cpp's --cpu-moe) on the same model:
  zero-copy   experts read from the mmap, no plugin (rotary's experts-on-host placement)
  repacked    llama.cpp copies the experts into its CPU repacking buffers (--repack)
  plugin-0    the rotary plugin claims the expert FFN with 0 slots (CPU stand-in device): pure overhead
  plugin-all  every expert resident in the stand-in's slots (the device path, run on a second CPU backend)
  calibrating what `rotary calibrate` runs: plugin-0 with its per-layer counters read once per phase
              (no per-token work; `--trace` adds taking each token's routing)
Two models stay loaded (zero-copy and repacked); the plugin is configured or reset between runs (each run
starts with a prompt batch, so llama.cpp rebuilds its graph and asks the plugin afresh which ops it
takes). The order of the variants rotates every round so machine noise hits all alike. Prints decode
tok/s medians and ratios against zero-copy.

    .venv/bin/python benchmarks/plugin_overhead.py [MODEL.gguf] [--rounds 6] [--tokens 128] [--threads N]

Without MODEL it uses the `small` synth model (Q4_K) from the demo cache, writing it first if needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from rotary_gguf import runtime
from rotary_gguf.demo import cached_synth_model
from rotary_gguf.gguf import open_index
from rotary_gguf.plan import plan_placement
from rotary_gguf.profile import load_profile
from rotary_gguf.rotation import LayerShape, Rotation

os.environ["ROTARY_SCHED_DEVICE"] = "cpu"
PROMPT = list(range(100, 164))


def decode(llm, tokens: int, residency=None) -> float:
    return runtime.generate_ids(llm, PROMPT, tokens, ignore_eos=True, residency=residency).decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=runtime.default_threads())
    args = parser.parse_args()
    path = args.model or cached_synth_model("small")[0]
    index = open_index(path)
    plugin = runtime.scheduler_plugin()
    host = plan_placement(index, load_profile("cpu-only"), strategy="experts-on-host", ctx=512)
    zero_copy = runtime.load(path, host, n_ctx=512, n_threads=args.threads).llm
    repacked = runtime.load(path, host, n_ctx=512, n_threads=args.threads, repack=True).llm

    def with_plugin(slots: int) -> float:
        plugin.configure(index)
        for layer in plugin.layers:
            plugin.set_resident(layer, list(range(plugin.set_slots(layer, slots))))
        return decode(zero_copy, args.tokens)

    def calibrating() -> float:
        """What `rotary calibrate` runs (without --trace): the plugin's counters, read once per phase."""
        plugin.configure(index)
        used = index.params.n_expert_used
        layers = {layer: LayerShape(plugin.n_expert(layer), used, 0, 0) for layer in plugin.layers}
        rate = decode(zero_copy, args.tokens, Rotation(plugin, layers, rotate=False))
        [plugin.layer_stats(layer).counts for layer in plugin.layers]
        return rate

    def without_plugin(llm) -> float:
        plugin.reset()
        return decode(llm, args.tokens)

    variants = {
        "zero-copy": lambda: without_plugin(zero_copy),
        "repacked": lambda: without_plugin(repacked),
        "plugin-0": lambda: with_plugin(0),
        "plugin-all": lambda: with_plugin(index.params.n_expert),
        "calibrating": calibrating,
    }
    names = list(variants)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            results[name].append(variants[name]())
    base = statistics.median(results["zero-copy"])
    print(f"{path.name}: {index.params.n_layer} layers, {index.params.n_expert} experts "
          f"({index.params.n_expert_used} used), {args.threads} threads, {args.tokens} tokens x {args.rounds} rounds")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<11} decode {median:7.1f} tok/s  ratio {median / base:.3f}  ("
              + ", ".join(f"{v:.0f}" for v in values) + ")")


if __name__ == "__main__":
    main()

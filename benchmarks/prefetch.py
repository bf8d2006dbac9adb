#!/usr/bin/env python3
"""Cross-layer prefetch, measured on the shipped model's recorded traces (which carry the plugin's own
predictions: the next layer's router on this layer's MoE input, recorded by `rotary calibrate --trace`).

For each trace, slot count (1/8, 1/4, 1/2 of the experts) and copy budget, the simulator replays the trace
with every history-only policy and with the default policy plus prefetch; printed: the best history-only hit
rate, the prefetching one, the gain, the offline optimum under the admission delay, and a control with
the predictions replaced by random experts (the per-layer switch-off must keep it from hurting). Budgets:
  profile   the runtime's default copy budget for this trace on the profile (this 26 MB model's token is
            short, so it allows about half an expert per layer per token)
  q30b      the budget Qwen3-30B-A3B gets on the same profile, as experts per layer per token (computed
            from the synthetic trace with its shapes), scaled to this model's expert size
  unlimited no budget
The "random predictions" control replays the default policy with each prediction replaced by random
experts; compare it with the default policy alone. Then per-layer prediction recall, and the prediction's
cost: the plugin's native router product at Qwen3-30B-A3B shapes (128 experts x 2,048), per layer and per
token of 48 layers.

    .venv/bin/python benchmarks/prefetch.py [--profile rtx4060-laptop-8gb] [--json benchmarks/prefetch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from rotary_gguf.profile import load_profile
from rotary_gguf.rotation import DEFAULT_POLICY, POLICIES
from rotary_gguf.simulate import default_budget, offline_optimum, simulate
from rotary_gguf.trace import Trace, read_trace, synthetic_trace

ROOT = Path(__file__).resolve().parent.parent
TRACES = ("stdlib-moe.rtrc", "stdlib-moe-click.rtrc")


def q30b_experts_per_layer(profile, fraction: int) -> float:
    """The default copy budget of a Qwen3-30B-A3B-shaped trace, in experts per layer per token."""
    trace = synthetic_trace(requests=1, prompt_tokens=4, decode_tokens=2)
    slots = trace.header.n_expert // fraction
    return default_budget(trace, slots, profile) / (trace.header.slot_bytes[0] * len(trace.header.layers))


def shuffled(trace: Trace, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    n = trace.header.n_expert
    return Trace(trace.header, trace.steps, [
        {layer: rng.permutation(n)[: ids.size].astype(np.int32) for layer, ids in step.items()}
        for step in trace.predictions])


def per_layer_recall(trace: Trace) -> dict[int, float]:
    right, total = {}, {}
    for i, (phase, routing) in enumerate(trace.steps):
        for layer, predicted in trace.predicted(i).items():
            if phase == "decode" and predicted.size:
                right[layer] = right.get(layer, 0) + len(set(routing[layer].tolist()) & set(predicted.tolist()))
                total[layer] = total.get(layer, 0) + routing[layer].size
    return {layer: right[layer] / total[layer] for layer in sorted(total)}


def compare(trace: Trace, profile, fraction: int) -> list[dict]:
    h = trace.header
    slots = h.n_expert // fraction
    optimum = offline_optimum(trace, slots)
    slot_bytes = h.slot_bytes[h.layers[0]] * len(h.layers)
    budgets = {"profile": None, "q30b": int(q30b_experts_per_layer(profile, fraction) * slot_bytes),
               "unlimited": 1 << 60}
    rows = []
    for name, budget in budgets.items():
        def run(policy, data=trace, prefetch=False, budget=budget):
            return simulate(data, slots, policy, profile, budget_bytes=budget, optimum=optimum, prefetch=prefetch)

        history = {p: run(p) for p in POLICIES}
        best = max(history, key=lambda p: history[p].hit_rate)
        with_prefetch = run(DEFAULT_POLICY, prefetch=True)
        control = run(DEFAULT_POLICY, data=shuffled(trace), prefetch=True)
        rows.append({"slots": slots, "fraction": f"1/{fraction}", "budget": name,
                     "budget_bytes": with_prefetch.budget_bytes,
                     "best_history": best, "best_history_hit_rate": history[best].hit_rate,
                     "default_history_hit_rate": history[DEFAULT_POLICY].hit_rate,
                     "prefetch_hit_rate": with_prefetch.hit_rate,
                     "gain": with_prefetch.hit_rate - history[best].hit_rate,
                     "optimal_delayed_hit_rate": optimum.delayed_hit_rate, "optimal_hit_rate": optimum.hit_rate,
                     "prefetches_per_token": with_prefetch.prefetches_per_token,
                     "prefetch_precision": with_prefetch.prefetch_precision,
                     "random_predictions_hit_rate": control.hit_rate,
                     "random_predictions_prefetches_per_token": control.prefetches_per_token})
    return rows


def prediction_cost(repetitions: int = 2000) -> tuple[tuple[float, float], tuple[float, float]]:
    """Microseconds per native router prediction at Qwen3-30B-A3B shapes through ctypes, and the same call on
    a router of width 32 (nearly all call overhead); (mean, sd) over 5 runs each, interleaved."""
    os.environ.setdefault("ROTARY_SCHED_DEVICE", "cpu")
    import tempfile

    from rotary_gguf.gguf import open_index
    from rotary_gguf.router import Router
    from rotary_gguf.runtime.scheduler import scheduler_plugin
    from rotary_gguf.synth import PRESETS, synth_model

    with tempfile.TemporaryDirectory() as tmp:
        path = synth_model(Path(tmp) / "q30.gguf", PRESETS["qwen3-30b-a3b"], "q4_k", sparse=True).path
        index = open_index(path)
        rng = np.random.default_rng(0)
        p = index.params
        with scheduler_plugin("cpu").open_model(index) as model:
            full, narrow = index.moe_layers[1], index.moe_layers[2]
            widths = {full: p.n_embd, narrow: 32}
            for layer, width in widths.items():
                weight = rng.normal(size=(p.n_expert, width)).astype(np.float32)
                model.set_router(layer, Router(layer, weight, p.n_expert_used, "softmax"))
            inputs = {layer: rng.normal(size=width).astype(np.float32) for layer, width in widths.items()}
            runs: dict[int, list[float]] = {full: [], narrow: []}
            for _ in range(5):
                for layer in (full, narrow):
                    started = time.perf_counter()
                    for _ in range(repetitions):
                        model.predict(layer, inputs[layer])
                    runs[layer].append((time.perf_counter() - started) / repetitions * 1e6)
    return ((statistics.mean(runs[full]), statistics.stdev(runs[full])),
            (statistics.mean(runs[narrow]), statistics.stdev(runs[narrow])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="rtx4060-laptop-8gb")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    print(f"# cross-layer prefetch ({platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"profile {profile.name}; default policy {DEFAULT_POLICY})\n")
    results = {"profile": profile.name, "traces": {}}
    for name in TRACES:
        trace = read_trace(ROOT / "benchmarks" / "traces" / name)
        recall = per_layer_recall(trace)
        rows = [row for fraction in (8, 4, 2) for row in compare(trace, profile, fraction)]
        results["traces"][name] = {"decode_tokens": trace.decode_steps, "recall_by_layer": recall, "rows": rows}
        print(f"## {name}: {trace.decode_steps} decoded tokens; prediction recall by layer: "
              + ", ".join(f"{layer}: {r:.1%}" for layer, r in recall.items()) + "\n")
        print(f"| slots | budget | best history-only | {DEFAULT_POLICY} + prefetch | gain | delayed optimum "
              f"| prefetches/token | of them used | {DEFAULT_POLICY} alone | random predictions |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['slots']} ({r['fraction']}) | {r['budget']} | {r['best_history']} "
                  f"{r['best_history_hit_rate']:.1%} | {r['prefetch_hit_rate']:.1%} | {100 * r['gain']:+.1f} pts "
                  f"| {r['optimal_delayed_hit_rate']:.1%} | {r['prefetches_per_token']:.2f} "
                  f"| {r['prefetch_precision']:.0%} | {r['default_history_hit_rate']:.1%} "
                  f"| {r['random_predictions_hit_rate']:.1%} "
                  f"({r['random_predictions_prefetches_per_token']:.2f}/token) |")
        print()
    (mean, sd), (call, call_sd) = prediction_cost()
    results["prediction_us_per_layer"] = {"mean": mean, "sd": sd, "call_overhead_mean": call,
                                          "call_overhead_sd": call_sd}
    print(f"prediction cost at Qwen3-30B-A3B shapes (128 x 2048, bfloat16 weights, one thread), through ctypes: "
          f"{mean:.1f} ± {sd:.1f} µs per layer; the same call at width 32: {call:.1f} ± {call_sd:.1f} µs; so about "
          f"{mean - call:.1f} µs in the plugin, {48 * (mean - call) / 1000:.2f} ms per token of 48 layers")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

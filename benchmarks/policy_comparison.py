#!/usr/bin/env python3
"""Rotation policies compared on routing traces: hit rate, share of the offline optimum, bytes copied.

    .venv/bin/python benchmarks/policy_comparison.py [TRACE ...] [--fractions 8 4 2] [--profile NAME] [--plot PNG]

Without TRACE it uses the synthetic Qwen3-30B-A3B trace (`rotary trace synth` defaults). Slots per layer are
1/8, 1/4 and 1/2 of each trace's experts unless --fractions says otherwise. Every row uses the runtime's
default copy budget for the profile (its PCIe bandwidth; see rotary_gguf.simulate); "of optimum" is the hit
rate over the offline optimum under the runtime's admission delay (docs/rotation.md, "The yardstick").
A trace that recorded the plugin's cross-layer predictions adds a column for the default policy with
prefetch (docs/rotation.md, "Cross-layer prefetch"); "-" where a trace has none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rotary_gguf.profile import load_profile
from rotary_gguf.rotation import DEFAULT_POLICY, POLICIES
from rotary_gguf.simulate import plot_curve, simulate_policies
from rotary_gguf.trace import read_trace, synthetic_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("traces", type=Path, nargs="*")
    parser.add_argument("--fractions", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--profile", default="rtx4060-laptop-8gb")
    parser.add_argument("--plot", type=Path, default=None, help="the hit-rate curve of the first trace")
    args = parser.parse_args()
    traces = [(str(path), read_trace(path)) for path in args.traces] or [("synthetic", synthetic_trace())]
    profile = load_profile(args.profile)
    print(f"copy budget from {profile.name}")
    print("| trace | slots | optimum (delayed) | " + " | ".join(POLICIES) + f" | {DEFAULT_POLICY} + prefetch |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in POLICIES) + " | --- |")
    for name, trace in traces:
        n = trace.header.n_expert
        label = f"{Path(name).name} ({trace.decode_steps} tokens, {n} experts, top-{trace.header.n_expert_used})"
        for fraction in args.fractions:
            k = max(1, n // fraction)
            results = simulate_policies(trace, k, list(POLICIES), profile, prefetch=True)
            history = {r.policy: r for r in results if not r.prefetch}
            prefetched = [r for r in results if r.prefetch and r.policy == DEFAULT_POLICY]
            cells = [f"{history[p].hit_rate:.1%} ({history[p].share_of_optimal:.2f})" for p in POLICIES]
            cells.append(f"{prefetched[0].hit_rate:.1%} ({prefetched[0].share_of_optimal:.2f})" if prefetched else "-")
            print(f"| {label} | {k} (1/{fraction}) | {results[0].optimal_delayed_hit_rate:.1%} | " + " | ".join(cells)
                  + " |")
    if args.plot:
        name, trace = traces[0]
        print(f"wrote {plot_curve(trace, list(POLICIES), profile, args.plot, None)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Rotation policies compared on a routing trace: hit rate and bytes copied per token against slots.

    .venv/bin/python benchmarks/policy_comparison.py TRACE [--slots 8 16 32] [--profile NAME] [--plot PNG]

Without TRACE it generates the synthetic Qwen3-30B-A3B trace (`rotary trace synth` defaults). Every row
uses the runtime's default copy budget for the profile (its PCIe bandwidth; see rotary_gguf.simulate).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rotary_gguf.profile import load_profile
from rotary_gguf.rotation import POLICIES
from rotary_gguf.simulate import plot_curve, simulate
from rotary_gguf.trace import read_trace, synthetic_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, nargs="?")
    parser.add_argument("--slots", type=int, nargs="+", default=None)
    parser.add_argument("--profile", default="rtx4060-laptop-8gb")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    trace = read_trace(args.trace) if args.trace else synthetic_trace()
    profile = load_profile(args.profile)
    n = trace.header.n_expert
    slots = args.slots or [n // 16, n // 8, n // 4, n // 2]
    kind = "synthetic" if trace.header.synthetic else "recorded"
    print(f"{trace.header.model} ({kind} trace): {trace.decode_steps} decoded tokens, {len(trace.header.layers)} "
          f"layers x {n} experts ({trace.header.n_expert_used} used); copy budget from {profile.name}")
    print(f"{'slots':>6} {'policy':<8}{'hit rate':>10}{'no rotation':>13}{'MiB copied/token':>18}{'budget MiB':>12}")
    for k in slots:
        for policy in POLICIES:
            r = simulate(trace, k, policy, profile)
            print(f"{k:>6} {policy:<8}{r.hit_rate:>10.1%}{r.static_hit_rate:>13.1%}"
                  f"{r.bytes_copied_per_token / 2**20:>18.2f}{(r.budget_bytes or 0) / 2**20:>12.1f}")
    if args.plot:
        print(f"wrote {plot_curve(trace, list(POLICIES), profile, args.plot, None)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Per-token cost of the rotation decisions: the native engine (native/decide.cpp) against the Python
Rotator it replaced (rotary_gguf/rotation.py as of commit 1bd4b7e, read from git).

On a synthetic trace with Qwen3-30B-A3B shapes (48 layers x 128 experts, 8 used) and 38 slots per layer
under the rtx4060-laptop-8gb profile's copy budget, each variant replays the whole trace with a fresh
rotator and the time of its decoded tokens' after_token calls is divided by their count:
  python       the old Python Rotator (numpy)
  native       Rotator.after_token: routing dict -> flat arrays -> one native call (the simulator's path)
  native-call  the native call alone on pre-flattened routing (the runtime's after_recorded_token
               additionally takes the routing from the plugin's record, natively)
Variants are interleaved, their order rotating every repetition. Prints mean ± sd per token and ratios,
and checks that both make the same decisions (equal hit rates and bytes copied): the native engine runs
with the old module's policy numbers, since the defaults changed after it.

    .venv/bin/python benchmarks/decision_cost.py [--repetitions 7] [--decode-tokens 256] [--slots 38]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rotary_gguf.profile import load_profile
from rotary_gguf.report import format_mean_sd
from rotary_gguf.rotation import LayerShape, Policy, Rotator, make_policy
from rotary_gguf.simulate import default_budget
from rotary_gguf.trace import synthetic_trace

OLD_COMMIT = "1bd4b7e"  # the last commit with the decisions in Python


def old_rotation():
    """rotation.py as of OLD_COMMIT, imported as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:rotary_gguf/rotation.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_rotation.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_rotation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_rotation"] = module
    spec.loader.exec_module(module)
    return module


def old_parameters(policy: Policy, old) -> Policy:
    """The policy with the old module's numbers (its decay and prior weight; it had no admission margin), so
    that both implementations decide alike; today's defaults came later (docs/rotation.md)."""
    if policy.kind != "frequency":
        return policy
    weight = old.HYBRID_PRIOR_WEIGHT if policy.request_weight else 0.0
    return replace(policy, decay=old.LFU_DECAY, request_weight=weight, calibration_weight=weight, admit_margin=0.0)


def replay(make, trace, flat: bool) -> tuple[float, float, int]:
    """(seconds per decoded token in after_token, hit rate, bytes copied) of one fresh rotator over the trace."""
    rotator = make()
    spent, tokens = 0.0, 0
    for phase, routing in trace.steps:
        if phase == "prompt":
            rotator.after_prompt(routing)
            continue
        if flat:
            ids, counts = rotator.routing_arrays(routing)
            budget = rotator.budget()
            start = time.perf_counter()
            rotator.native.after_token(ids, counts, budget)
        else:
            start = time.perf_counter()
            rotator.after_token(routing)
        spent += time.perf_counter() - start
        tokens += 1
    return spent / tokens, rotator.hit_rate, int(sum(rotator.copied_per_token))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--slots", type=int, default=38)
    parser.add_argument("--policy", default="hybrid")
    args = parser.parse_args()
    trace = synthetic_trace(requests=2, prompt_tokens=64, decode_tokens=args.decode_tokens)
    h = trace.header
    budget = default_budget(trace, args.slots, load_profile("rtx4060-laptop-8gb"))
    old = old_rotation()
    new_layers = {layer: LayerShape(h.n_expert, h.n_expert_used, args.slots, h.slot_bytes[layer]) for layer in h.layers}
    old_layers = {layer: old.LayerShape(h.n_expert, h.n_expert_used, args.slots, h.slot_bytes[layer])
                  for layer in h.layers}
    policy = old_parameters(make_policy(args.policy, new_layers), old)
    variants = {
        "python": (lambda: old.Rotator(old_layers, old.make_policy(args.policy, old_layers), lambda: budget), False),
        "native": (lambda: Rotator(new_layers, policy, lambda: budget), False),
        "native-call": (lambda: Rotator(new_layers, policy, lambda: budget), True),
    }
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    outcome: dict[str, tuple[float, int]] = {}
    for rep in range(args.repetitions):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            make, flat = variants[name]
            per_token, hit_rate, copied = replay(make, trace, flat)
            seconds[name].append(per_token)
            outcome[name] = (hit_rate, copied)
    assert len(set(outcome.values())) == 1, f"the variants decided differently: {outcome}"
    print(f"{h.model}: {len(h.layers)} layers x {h.n_expert} experts ({h.n_expert_used} used), {args.slots} slots "
          f"per layer, policy {args.policy}, copy budget {budget / 2**20:.1f} MiB/token; "
          f"{trace.decode_steps} decoded tokens x {args.repetitions} repetitions, interleaved")
    print(f"hit rate {outcome['python'][0]:.4f} and {outcome['python'][1] / 2**20:.0f} MiB copied, identical in "
          f"every variant; {platform.processor() or platform.machine()}, {platform.python_version()}")
    base = statistics.mean(seconds["python"])
    for name in names:
        us = [s * 1e6 for s in seconds[name]]
        stats = {"mean": statistics.mean(us), "sd": statistics.stdev(us) if len(us) > 1 else 0.0}
        ratio = base / statistics.mean(seconds[name])
        print(f"{name:<12} {format_mean_sd(stats):>16} us/token (best {min(us):.1f})   python / {name}: {ratio:.1f}x")


if __name__ == "__main__":
    main()

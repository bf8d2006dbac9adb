"""`rotary simulate`: replay a routing trace against slot counts and rotation policies.

The simulator drives the same Rotator as the running plugin (rotation.py), so on a trace recorded by
`rotary bench --trace` it reproduces the plugin's hit rate exactly for the same slots, policy and copy
budget. Decode speed is predicted from the profile's bandwidths, bound by weight reads: per token the
non-expert weights and the hits come from VRAM while the misses are computed from host RAM
concurrently, and the copies must fit the PCIe link in the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rotary_gguf.errors import RotaryError
from rotary_gguf.profile import Profile
from rotary_gguf.report import pyplot, save_png
from rotary_gguf.rotation import COPY_BUDGET_SHARE, LayerShape, Rotator, make_policy
from rotary_gguf.trace import Trace


@dataclass(frozen=True)
class SimulationResult:
    policy: str
    slots: int  # per layer
    hit_rate: float  # decoded (token, expert) selections served from slots
    bytes_copied_per_token: float
    budget_bytes: int | None
    decode_tokens: int
    predicted_decode_tok_s: float
    static_hit_rate: float  # the same slots seeded from each prompt, never rotated

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "slots": self.slots, "hit_rate": round(self.hit_rate, 4),
                "bytes_copied_per_token": round(self.bytes_copied_per_token),
                "budget_bytes": self.budget_bytes, "decode_tokens": self.decode_tokens,
                "predicted_decode_tok_s": round(self.predicted_decode_tok_s, 1),
                "static_hit_rate": round(self.static_hit_rate, 4)}


def slots_for_vram(trace: Trace, vram_bytes: int) -> int:
    """Slots per layer that vram_bytes holds (the same number in every layer of the trace)."""
    per_row = sum(trace.header.slot_bytes.values())
    if per_row <= 0:
        raise RotaryError("the trace records no slot sizes; give --slots instead of --vram")
    return min(trace.header.n_expert, vram_bytes // per_row)


def predict_decode_tok_s(trace: Trace, hit_rate: float, bytes_copied_per_token: float, profile: Profile) -> float:
    h = trace.header
    experts = h.n_expert_used * sum(h.slot_bytes.values())  # expert bytes one token reads, all layers
    def seconds(nbytes: float, gbs: float) -> float:
        return nbytes / (gbs * 1e9) if gbs else 0.0

    # Attention and the other dense weights first, then each MoE block's hits (GPU) and misses (CPU) at once.
    compute = seconds(h.dense_bytes, profile.gpu_memory_gbs) + max(
        seconds(hit_rate * experts, profile.gpu_memory_gbs), seconds((1 - hit_rate) * experts, profile.host_ram_gbs))
    total = max(compute, seconds(bytes_copied_per_token, profile.pcie_gbs))
    return 1 / total if total > 0 else 0.0


def default_budget(trace: Trace, slots: int, profile: Profile) -> int:
    """The runtime's copy budget: COPY_BUDGET_SHARE of what PCIe moves in one token, the token time taken
    from the static (never rotated) share of reads the slots would serve."""
    static = min(1.0, slots / trace.header.n_expert)
    return int(COPY_BUDGET_SHARE * profile.pcie_gbs * 1e9 / max(predict_decode_tok_s(trace, static, 0, profile), 1e-9))


def _run(trace: Trace, slots: int, policy: str, budget: int | None, rotate: bool,
         prior: dict[int, np.ndarray] | None) -> Rotator:
    h = trace.header
    layers = {layer: LayerShape(h.n_expert, h.n_expert_used, min(slots, h.n_expert), h.slot_bytes.get(layer, 0))
              for layer in h.layers}
    rotator = Rotator(layers, make_policy(policy, layers, prior), lambda: budget)
    for phase, routing in trace.steps:
        if phase == "prompt":
            rotator.after_prompt(routing)
        elif rotate:
            rotator.after_token(routing)
        else:
            rotator.step += 1
            for layer, ids in routing.items():
                hit = int(np.count_nonzero(rotator.slot_of[layer][ids] >= 0))
                rotator.counters[layer].hits += hit
                rotator.counters[layer].misses += len(ids) - hit
    return rotator


def simulate(trace: Trace, slots: int, policy: str, profile: Profile, *, budget_bytes: int | None = None,
             prior: dict[int, np.ndarray] | None = None) -> SimulationResult:
    """Replay the trace with `slots` per layer; budget_bytes None: the runtime's default from the profile."""
    budget = default_budget(trace, slots, profile) if budget_bytes is None else budget_bytes
    rotated = _run(trace, slots, policy, budget, True, prior)
    static = _run(trace, slots, policy, budget, False, prior)
    tokens = trace.decode_steps
    copied = sum(c.bytes_copied for c in rotated.counters.values()) / max(1, tokens)
    return SimulationResult(policy, slots, rotated.hit_rate, copied, budget, tokens,
                            predict_decode_tok_s(trace, rotated.hit_rate, copied, profile), static.hit_rate)


def plot_curve(trace: Trace, policies: list[str], profile: Profile, out: Path, budget_bytes: int | None) -> Path:
    """Hit rate against slots per layer, one line per policy (and never-rotated slots), as a PNG."""
    plt = pyplot()
    n = trace.header.n_expert
    points = sorted({max(1, round(n * f)) for f in (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)})
    figure, axes = plt.subplots(figsize=(7, 4.5))
    results = {p: [simulate(trace, k, p, profile, budget_bytes=budget_bytes) for k in points] for p in policies}
    for policy, rows in results.items():
        axes.plot(points, [r.hit_rate for r in rows], marker="o", label=policy)
    axes.plot(points, [r.static_hit_rate for r in results[policies[0]]], linestyle="--", label="no rotation")
    label = "synthetic" if trace.header.synthetic else "recorded"
    axes.set(xlabel=f"slots per layer (of {n} experts)", ylabel="expert reads served from VRAM",
             title=f"{trace.header.model} ({label} trace)", ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend()
    return save_png(figure, out)

"""`rotary simulate`: replay a routing trace against slot counts and rotation policies.

The simulator drives the same Rotator as the running plugin (rotation.py), so on a trace recorded by
`rotary bench --trace` it reproduces the plugin's hit rate exactly for the same slots, policy and copy
budget. Decode speed is predicted from the profile's bandwidths, bound by weight reads: per token the
non-expert weights and the hits come from VRAM while the misses are computed from host RAM
concurrently, and the copies must fit the PCIe link in the same time.

The yardstick beside the policies is the offline optimum on the same trace and slots (no copy budget):
Belady's MIN with immediate admission, and Belady's rule under the runtime's admission delay (see
`offline_optimum`). A trace recorded with the plugin's cross-layer predictions (format version 2) also
replays them: before each decoded token's routing, each layer's prediction goes to the Rotator's prefetch
in layer order, as the plugin hands them over during the token. Prefetch can beat the delayed optimum,
which only knows history-driven admissions.
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
    optimal_hit_rate: float = 0.0  # OfflineOptimum.hit_rate
    optimal_delayed_hit_rate: float = 0.0  # OfflineOptimum.delayed_hit_rate
    prefetch: bool = False  # the trace's predictions replayed (cross-layer prefetch)
    prediction_recall: float = 0.0  # selections the predictions named, of those in predicted tokens
    prefetches_per_token: float = 0.0  # experts copied on a prediction per decoded token
    prefetch_precision: float = 0.0  # prefetched experts the token then selected, of those prefetched

    @property
    def label(self) -> str:
        return f"{self.policy}+prefetch" if self.prefetch else self.policy

    @property
    def share_of_optimal(self) -> float:
        """The policy's hit rate over the offline optimum under the runtime's admission delay."""
        return self.hit_rate / self.optimal_delayed_hit_rate if self.optimal_delayed_hit_rate else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "slots": self.slots, "hit_rate": round(self.hit_rate, 4),
                "bytes_copied_per_token": round(self.bytes_copied_per_token),
                "budget_bytes": self.budget_bytes, "decode_tokens": self.decode_tokens,
                "predicted_decode_tok_s": round(self.predicted_decode_tok_s, 1),
                "static_hit_rate": round(self.static_hit_rate, 4),
                "optimal_hit_rate": round(self.optimal_hit_rate, 4),
                "optimal_delayed_hit_rate": round(self.optimal_delayed_hit_rate, 4),
                "share_of_optimal": round(self.share_of_optimal, 4), "prefetch": self.prefetch,
                "prediction_recall": round(self.prediction_recall, 4),
                "prefetches_per_token": round(self.prefetches_per_token, 3),
                "prefetch_precision": round(self.prefetch_precision, 4)}


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


@dataclass(frozen=True)
class OfflineOptimum:
    """Hit rates of an oracle that knows the whole trace, with the same slots per layer and no copy budget.

    hit_rate: Belady's MIN with immediate admission (an expert missed at token i may serve from token i+1),
    optimal here. delayed_hit_rate: Belady's rule under the runtime's admission delay (missed at token i,
    serving from token i+2, its victim gone from token i+1): an achievable schedule, so a lower bound of the
    true delayed optimum, which it can miss (docs/rotation.md, "The yardstick")."""

    hit_rate: float
    delayed_hit_rate: float


def offline_optimum(trace: Trace, slots: int) -> OfflineOptimum:
    """The oracle on every layer of the trace over its decoded tokens. Each prompt seeds the slots as the
    runtime does (Rotator.after_prompt, ties to the oracle's own residents); between prompts, after each
    token the oracle keeps, of its residents and the token's misses, the `slots` needed soonest."""
    return OfflineOptimum(_oracle_hit_rate(trace, slots, delayed=False), _oracle_hit_rate(trace, slots, delayed=True))


def _oracle_hit_rate(trace: Trace, slots: int, delayed: bool) -> float:
    h = trace.header
    n = min(slots, h.n_expert)
    layers = {layer: LayerShape(h.n_expert, h.n_expert_used, n, 0) for layer in h.layers}
    seeder = Rotator(layers, make_policy("lru", layers))  # only its prompt seeding is used
    serving = np.zeros((len(layers), h.n_expert), dtype=bool)
    pending = np.zeros_like(serving)  # admitted after the last token, serving from the next but one
    hits = reads = 0
    for prompt, decoded in _requests(trace):
        if prompt is not None:
            serving, pending = _seed(seeder, serving | pending, prompt), np.zeros_like(pending)
        counts = np.zeros((len(decoded), len(layers), h.n_expert), dtype=np.int64)
        for t, routing in enumerate(decoded):
            for layer, ids in routing.items():
                counts[t, seeder.row[layer]] += np.bincount(ids, minlength=h.n_expert)
        reads += int(counts.sum())
        if n and len(decoded):
            hits += _belady(counts, serving, pending, n, delayed)
    return hits / reads if reads else 0.0


def _requests(trace: Trace) -> list[tuple[dict[int, np.ndarray] | None, list[dict[int, np.ndarray]]]]:
    """The trace as (prompt routing or None, the decoded tokens' routing after it)."""
    out: list[tuple[dict[int, np.ndarray] | None, list[dict[int, np.ndarray]]]] = []
    for phase, routing in trace.steps:
        if phase == "prompt" or not out:
            out.append((routing if phase == "prompt" else None, []))
        if phase == "decode":
            out[-1][1].append(routing)
    return out


def _seed(seeder: Rotator, resident: np.ndarray, prompt: dict[int, np.ndarray]) -> np.ndarray:
    """The runtime's prompt seeding (Rotator.after_prompt) from the oracle's residents."""
    for layer, row in seeder.row.items():
        seeder.set_resident(layer, np.flatnonzero(resident[row]).tolist())
    seeder.after_prompt(prompt)
    return np.stack([seeder.slot_of[layer] >= 0 for layer in sorted(seeder.row)])


def _belady(counts: np.ndarray, serving: np.ndarray, pending: np.ndarray, n: int, delayed: bool) -> int:
    """Hits over counts [tokens, layers, experts] (selections), updating serving and pending in place.
    After each token, of the residents (the copies in flight committed, as Rotator._commit) and the token's
    misses, the n used again soonest stay: a resident's next use counts from the next token, a miss's from
    the token it can first serve (the next but one when delayed); the others are evicted or not admitted."""
    tokens = len(counts)
    never = tokens + 1
    requested = counts > 0
    # next_use[t]: the first token after t that selects the expert (never: not in this request)
    next_use = np.full((tokens + 1, *counts.shape[1:]), never, dtype=np.int64)
    for t in range(tokens - 2, -1, -1):
        next_use[t] = np.where(requested[t + 1], t + 1, next_use[t + 1])
    hits = 0
    for t in range(tokens):
        hits += int(counts[t][serving].sum())
        resident = serving | pending
        newcomer = requested[t] & ~resident
        key = np.where(resident, next_use[t], np.where(newcomer, next_use[t + delayed], never))
        # Residents first among equals; keep the n nearest; admit no expert that is not needed again.
        rank = np.argsort(2 * key + newcomer, axis=1, kind="stable")[:, :n]
        keep = np.zeros_like(resident)
        np.put_along_axis(keep, rank, True, axis=1)
        keep &= resident | newcomer & (key < never)
        serving[:] = keep & (resident if delayed else resident | newcomer)
        pending[:] = keep & newcomer if delayed else False
    return hits


def _run(trace: Trace, slots: int, policy: str, budget: int | None, rotate: bool,
         prior: dict[int, np.ndarray] | None, prefetch: bool = False) -> Rotator:
    h = trace.header
    layers = {layer: LayerShape(h.n_expert, h.n_expert_used, min(slots, h.n_expert), h.slot_bytes.get(layer, 0))
              for layer in h.layers}
    rotator = Rotator(layers, make_policy(policy, layers, prior), lambda: budget, prefetch=prefetch and rotate)
    if prior:  # the runtime seeds a calibrated model's slots at load (Rotation.seed_from_popularity)
        rotator.seed(prior)
    for i, (phase, routing) in enumerate(trace.steps):
        if phase == "prompt":
            rotator.before_prompt()
            rotator.after_prompt(routing)
        elif rotate:
            for layer, predicted in sorted(trace.predicted(i).items()) if prefetch else ():
                if predicted.size:
                    rotator.prefetch(layer, predicted)
            rotator.after_token(routing)
        else:
            rotator.step += 1
            for layer, ids in routing.items():
                hit = int(np.count_nonzero(rotator.slot_of[layer][ids] >= 0))
                rotator.counters[layer].hits += hit
                rotator.counters[layer].misses += len(ids) - hit
    return rotator


def simulate(trace: Trace, slots: int, policy: str, profile: Profile, *, budget_bytes: int | None = None,
             prior: dict[int, np.ndarray] | None = None, optimum: OfflineOptimum | None = None,
             prefetch: bool = False) -> SimulationResult:
    """Replay the trace with `slots` per layer; budget_bytes None: the runtime's default from the profile.
    optimum: offline_optimum(trace, slots) when already computed (it does not depend on the policy).
    prefetch: replay the trace's recorded predictions (a trace without them simulates no prefetch)."""
    budget = default_budget(trace, slots, profile) if budget_bytes is None else budget_bytes
    rotated = _run(trace, slots, policy, budget, True, prior, prefetch)
    static = _run(trace, slots, policy, budget, False, prior)
    best = offline_optimum(trace, slots) if optimum is None else optimum
    tokens = trace.decode_steps
    t = rotated.totals()
    copied = t.bytes_copied / max(1, tokens)
    return SimulationResult(policy, slots, rotated.hit_rate, copied, budget, tokens,
                            predict_decode_tok_s(trace, rotated.hit_rate, copied, profile), static.hit_rate,
                            best.hit_rate, best.delayed_hit_rate, prefetch, _share(t.predicted_right, t.predicted),
                            t.prefetches / max(1, tokens), _share(t.prefetch_hits, t.prefetches))


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def simulate_policies(trace: Trace, slots: int, policies: list[str], profile: Profile, *,
                      budget_bytes: int | None = None, prior: dict[int, np.ndarray] | None = None,
                      prefetch: bool = False) -> list[SimulationResult]:
    """simulate() for each policy, the offline optimum computed once; with prefetch (and a trace that
    recorded predictions), each policy a second time with the predictions replayed."""
    optimum = offline_optimum(trace, slots)
    variants = (False, True) if prefetch and trace.has_predictions else (False,)
    return [simulate(trace, slots, p, profile, budget_bytes=budget_bytes, prior=prior, optimum=optimum,
                     prefetch=v) for v in variants for p in policies]


def plot_curve(trace: Trace, policies: list[str], profile: Profile, out: Path, budget_bytes: int | None) -> Path:
    """Hit rate against slots per layer, one line per policy (and never-rotated slots), as a PNG."""
    plt = pyplot()
    n = trace.header.n_expert
    points = sorted({max(1, round(n * f)) for f in (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)})
    figure, axes = plt.subplots(figsize=(7, 4.5))
    runs = [simulate_policies(trace, k, policies, profile, budget_bytes=budget_bytes) for k in points]
    for i, policy in enumerate(policies):
        axes.plot(points, [rows[i].hit_rate for rows in runs], marker="o", label=policy)
    axes.plot(points, [rows[0].static_hit_rate for rows in runs], linestyle="--", label="no rotation")
    axes.plot(points, [rows[0].optimal_delayed_hit_rate for rows in runs], linestyle=":",
              label="offline optimum (admission delay)")
    label = "synthetic" if trace.header.synthetic else "recorded"
    axes.set(xlabel=f"slots per layer (of {n} experts)", ylabel="expert reads served from VRAM",
             title=f"{trace.header.model} ({label} trace)", ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend()
    return save_png(figure, out)

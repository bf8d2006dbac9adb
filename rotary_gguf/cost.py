"""A per-token cost model of the three placements, so that `auto` can pick the fastest predicted one.

Pure functions of the model index, the profile and a placement (no llama.cpp): a decoded token costs its
weight reads (VRAM at the GPU's bandwidth, host RAM at the host's), plus, for every MoE layer whose experts
are read on the host, the fixed cost of the split boundary, plus the rotary plugin's own device traffic per
layer as its counters measure it (tests/test_plugin_gpu_path.py: one wait and three transfers per split
block), plus the DRAM the expert copies take from the host's experts. Latencies are stated assumptions
until scripts/gpu_first_checks.sh measures them on a GPU (docs/planner.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from rotary_gguf.gguf import ModelIndex
from rotary_gguf.plan import Placement, dense_read_bytes, plan_placement
from rotary_gguf.profile import Profile

CANDIDATES = ("layer-fill", "experts-on-host", "rotary")
SYNC_SECONDS = 20e-6  # one blocking wait on a GPU stream, launch included (assumed; check 3 measures it)
TRANSFER_SECONDS = 5e-6  # one small host <-> device copy issued (assumed)
# llama.cpp's own split boundary around a MoE layer whose experts run on the host: the activations go to
# the host and the expert output back (two copies, one wait for the host to read them).
BOUNDARY_TRANSFERS, BOUNDARY_SYNCS = 2, 1
# The plugin's own per split block, counted on the stand-in (docs/plugin.md, finding 3): input rows, ids
# and output rows in one queue, one wait.
ROTARY_TRANSFERS, ROTARY_SYNCS = 3, 1
ADMITTED_SHARE = 0.05  # of the missed expert bytes a token admits (simulator: 16 MiB of ~370 MiB missed)
COPY_DRAM_PASSES = 3  # each copied byte: read from the mapping, written to staging, read by the DMA
COPY_BUDGET_SHARE = 0.5  # rotation.COPY_BUDGET_SHARE: copies take at most half the PCIe time of a token


@dataclass(frozen=True)
class Candidate:
    """One placement's predicted decode speed, with what the rotary prediction rests on."""

    placement: str
    predicted_decode_tok_s: float
    hit_rate: float | None = None  # rotary: share of expert reads from VRAM slots
    break_even_hit_rate: float | None = None  # rotary: the hit rate at which it equals the best other

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"placement": self.placement,
                                  "predicted_decode_tok_s": round(self.predicted_decode_tok_s, 1)}
        if self.hit_rate is not None:
            out["hit_rate"] = round(self.hit_rate, 4)
        if self.break_even_hit_rate is not None:
            out["break_even_hit_rate"] = round(self.break_even_hit_rate, 4)
        return out


def _seconds(index: ModelIndex, placement: Placement, profile: Profile, hit_rate: float) -> float:
    """Seconds of one decoded token at this hit rate (linear in it)."""
    p = index.params
    dense = dense_read_bytes(index)
    gpu_bw = profile.gpu_memory_gbs * 1e9 if profile.gpu_memory_gbs else 0.0
    host_bw = profile.host_ram_gbs * 1e9 if profile.host_ram_gbs else 0.0
    on_gpu = placement.vram_budget_bytes > 0 and gpu_bw > 0
    slots = dict(placement.expert_slots)
    seconds = dense / gpu_bw if on_gpu else (dense / host_bw if host_bw else 0.0)
    for layer in index.moe_layers:
        used = p.n_expert_used * index.expert_bytes(layer)
        if on_gpu and layer in placement.gpu_expert_layers:
            seconds += used / gpu_bw
            continue
        host_s = used / host_bw if host_bw else 0.0
        seconds += host_s
        if not on_gpu:
            continue
        seconds += BOUNDARY_SYNCS * SYNC_SECONDS + BOUNDARY_TRANSFERS * TRANSFER_SECONDS
        if slots.get(layer, 0) > 0:
            device_s = used / gpu_bw
            seconds -= hit_rate * (host_s - device_s)
            seconds += ROTARY_SYNCS * SYNC_SECONDS + ROTARY_TRANSFERS * TRANSFER_SECONDS
            copied = ADMITTED_SHARE * (1 - hit_rate) * p.n_expert_used * index.slot_bytes(layer)
            seconds += COPY_DRAM_PASSES * copied / host_bw if host_bw else 0.0
    return seconds


def predict_decode_tok_s(index: ModelIndex, placement: Placement, profile: Profile,
                         hit_rate: float | None = None) -> float:
    """Predicted decode tokens per second of a placement (rotary at `hit_rate`, else the plan's share)."""
    share = placement.device_read_share if hit_rate is None else hit_rate
    seconds = _seconds(index, placement, profile, share)
    return 1 / seconds if seconds > 0 else 0.0


def candidates(index: ModelIndex, profile: Profile, *, vram_budget: int | None = None, ctx: int | None = None,
               layer_order: str = "first", popularity: dict | None = None) -> tuple[Candidate, ...]:
    """Every placement's predicted decode speed under this profile; rotary's with its predicted hit rate and
    the hit rate it needs to match the best other placement."""
    out: dict[str, Candidate] = {}
    plans: dict[str, Placement] = {}
    for strategy in CANDIDATES:
        plans[strategy] = plan_placement(index, profile, strategy=strategy, vram_budget=vram_budget, ctx=ctx,
                                         layer_order=layer_order,
                                         popularity=popularity if strategy == "rotary" else None)
        if strategy != "rotary":
            out[strategy] = Candidate(strategy, predict_decode_tok_s(index, plans[strategy], profile))
    rotary = plans["rotary"]
    best_other = max(c.predicted_decode_tok_s for c in out.values())
    at_zero = _seconds(index, rotary, profile, 0.0)
    per_hit = at_zero - _seconds(index, rotary, profile, 1.0)  # seconds saved per unit of hit rate
    break_even = None
    if best_other > 0 and per_hit > 0:
        break_even = max(0.0, (at_zero - 1 / best_other) / per_hit)
    out["rotary"] = Candidate("rotary", predict_decode_tok_s(index, rotary, profile), rotary.device_read_share,
                              break_even)
    return tuple(out[s] for s in CANDIDATES)


def choose(options: tuple[Candidate, ...], rotary_runs: bool = True) -> tuple[str, str]:
    """The fastest predicted placement (rotary only where it runs and its hit rate beats the break-even),
    and why, in one line."""
    usable = [c for c in options if c.placement != "rotary" or rotary_runs]
    best = max(usable, key=lambda c: (c.predicted_decode_tok_s, c.placement != "rotary"))
    rotary = next(c for c in options if c.placement == "rotary")
    speeds = ", ".join(f"{c.placement} {c.predicted_decode_tok_s:.1f}" for c in options)
    if best.placement == "rotary":
        why = f"hit rate {rotary.hit_rate:.2f} beats the break-even {rotary.break_even_hit_rate or 0:.2f}"
    elif not rotary_runs:
        why = "rotary cannot run here"
    elif rotary.break_even_hit_rate is None or rotary.break_even_hit_rate > 1:
        why = "no hit rate makes rotary faster"
    else:
        why = f"rotary's hit rate {rotary.hit_rate or 0:.2f} is below the break-even {rotary.break_even_hit_rate:.2f}"
    return best.placement, f"auto: {best.placement} ({why}; predicted tok/s: {speeds})"

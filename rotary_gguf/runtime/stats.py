"""What a running model reports: speed and memory, and the rotary scheduler's counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rotary_gguf.rotation import COPY_BUDGET_SHARE, Rotation
from rotary_gguf.runtime.generation import Generation


@dataclass(frozen=True)
class LayerRotation:
    hits: int  # (token, expert) selections served from a VRAM slot
    misses: int
    admissions: int
    evictions: int
    bytes_copied: int
    prefetches: int = 0  # experts copied ahead of the layer on a prediction


@dataclass(frozen=True)
class RotaryStats:
    """The scheduler's counters since the last prompt ended (the decode), and how rotation is set up."""

    hit_rate: float
    expert_reads_device: int
    expert_reads_host: int
    policy: str
    copy_budget: str  # where the per-token copy budget comes from
    copy_budget_bytes_per_token: int | None  # its current value (None: unlimited or not yet measured)
    admissions: int
    evictions: int
    bytes_copied: int
    bytes_copied_per_token: int
    copy_stall_ms: float
    slots: dict[str, int]
    device: str
    per_layer: dict[str, LayerRotation]
    prefetch: bool = False  # cross-layer prefetch on
    prefetches: int = 0
    prediction_recall: float = 0.0  # of the decoded selections, those the predictions named
    prefetch_stall_ms: float = 0.0  # layers waiting for their prefetched experts

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_layer_hit_rate"] = {layer: round(c.hits / (c.hits + c.misses), 4) if c.hits + c.misses else 0.0
                                     for layer, c in self.per_layer.items()}
        return out


def _static(rotation: Rotation) -> str:
    """Why the slots do not rotate."""
    if not rotation.slots:
        return "none (no slots)"
    if all(s.n_slots >= s.n_expert for s in rotation.layers.values()):
        return "none (every expert resident)"
    return "none (static residency)"


def _copy_budget(rotation: Rotation) -> str:
    if not rotation.rotate:
        return _static(rotation)
    if rotation.fixed_budget is not None:
        return f"{rotation.fixed_budget} bytes per token (fixed)"
    if rotation.pcie_gbs:
        return f"{COPY_BUDGET_SHARE:g} x PCIe {rotation.pcie_gbs:g} GB/s x measured token time"
    return "unlimited (the profile gives no PCIe bandwidth)"


def rotary_stats(rotation: Rotation, description: str) -> RotaryStats:
    """The rotation's counters; description names the device the slots live on."""
    layers = rotation.layer_stats()
    device = sum(s.device_pairs for s in layers)
    host = sum(s.host_pairs for s in layers)
    copied = sum(s.bytes_copied for s in layers)
    tokens = max(1, len(rotation.rotator.copied_per_token))
    decided = rotation.rotator.totals()
    stats = rotation.plugin.stats()
    return RotaryStats(
        hit_rate=round(device / (device + host), 4) if device + host else 0.0,
        expert_reads_device=device, expert_reads_host=host,
        policy=rotation.rotator.policy.name if rotation.rotate else _static(rotation),
        copy_budget=_copy_budget(rotation), copy_budget_bytes_per_token=rotation.budget() if rotation.rotate else 0,
        admissions=sum(s.admissions for s in layers), evictions=sum(s.evictions for s in layers),
        bytes_copied=copied, bytes_copied_per_token=round(copied / tokens),
        copy_stall_ms=round(stats.stall_ns / 1e6, 3),
        slots={str(layer): n for layer, n in rotation.slots.items()}, device=description,
        per_layer={str(s.layer): LayerRotation(s.device_pairs, s.host_pairs, s.admissions, s.evictions,
                                               s.bytes_copied, s.prefetches) for s in layers},
        prefetch=rotation.rotator.prefetching, prefetches=sum(s.prefetches for s in layers),
        prediction_recall=round(decided.predicted_right / decided.predicted, 4) if decided.predicted else 0.0,
        prefetch_stall_ms=round(stats.prefetch_stall_ns / 1e6, 3))


@dataclass(frozen=True)
class EngineStats:
    last: Generation | None  # the last generation
    rss_bytes: int
    rss_model_bytes: int  # RSS added since before the model was loaded
    vram_used_bytes: int | None
    vram_total_bytes: int | None
    rotary: RotaryStats | None

"""How a model is opened: one frozen options object, its unset fields filled from the hardware profile."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from rotary_gguf.errors import RotaryError
from rotary_gguf.plan import LAYER_ORDERS
from rotary_gguf.profile import Profile
from rotary_gguf.rotation import POLICIES
from rotary_gguf.rpc import Endpoint
from rotary_gguf.runtime.llama import KV_TYPES, default_threads


class OptionsError(RotaryError):
    """An option value the runtime cannot use."""


@dataclass(frozen=True)
class EngineOptions:
    """Everything that decides how a model runs besides its file, profile and placement strategy.

    None means "the profile's" (ctx, threads, batch, ubatch, KV type, flash attention, rotation policy) or
    the runtime's default (copy budget: derived from the profile's PCIe bandwidth and the measured token
    time; max_batch: ROTARY_SCHED_MAX_BATCH, else 32 tokens on a GPU and every batch on the stand-in)."""

    ctx: int | None = None
    threads: int | None = None
    batch: int | None = None
    ubatch: int | None = None
    kv_cache_type: str | None = None
    flash_attention: bool | None = None
    repack: bool = False  # let llama.cpp copy host experts into its CPU repacking buffers
    vram_budget: int | None = None  # bytes
    layer_order: str = "first"  # which layers' experts get VRAM first (layer-fill)
    policy: str | None = None  # rotary: the slot rotation policy
    copy_budget: int | None = None  # rotary: bytes rotation may copy per decoded token
    rotate: bool = True  # rotary: False keeps the slots as seeded (static residency)
    prefetch: bool = True  # rotary: copy experts predicted one MoE layer ahead (while they predict well)
    trace: Path | None = None  # rotary: write the routing the scheduler saw to this trace
    trace_description: str = ""  # rotary: what the trace records (its header's description)
    replay: Path | None = None  # rotary, benchmarks only: compute this trace's experts instead of the router's
    max_batch: int | None = None  # rotary: larger batches are left whole to llama.cpp (<= 0: none are)
    routing_only: bool = False  # count routing with the plugin, no slots (calibration), on any machine
    seed: int = 0
    rpc: tuple[Endpoint, ...] = ()  # llama.cpp RPC servers for the expert layers that do not fit locally
    host_budget: int | None = None  # with rpc: host RAM this machine may use (bytes; None: what is available)

    def __post_init__(self) -> None:
        for name in ("ctx", "threads", "batch", "ubatch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionsError(f"{name} must be at least 1 (got {value})")
        if self.kv_cache_type is not None and self.kv_cache_type not in KV_TYPES:
            raise OptionsError(f"unknown KV cache type {self.kv_cache_type!r}; known: {', '.join(KV_TYPES)}")
        if self.policy is not None and self.policy not in POLICIES:
            raise OptionsError(f"unknown rotation policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.layer_order not in LAYER_ORDERS:
            raise OptionsError(f"unknown layer order {self.layer_order!r}; known: {', '.join(LAYER_ORDERS)}")
        for name in ("vram_budget", "copy_budget", "host_budget"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise OptionsError(f"{name} must not be negative (got {value})")

    def for_profile(self, profile: Profile) -> tuple[Profile, EngineOptions]:
        """The profile with these options' overrides applied (the planner prices KV type, ubatch and flash
        attention from it), and these options with every unset field taken from it (ctx stays with the plan)."""
        batch = self.batch or profile.batch
        effective = replace(
            profile,
            threads=self.threads or profile.threads or default_threads(),
            batch=batch,
            ubatch=min(self.ubatch or profile.ubatch, batch),
            kv_cache_type=self.kv_cache_type or profile.kv_cache_type,
            flash_attention=profile.flash_attention if self.flash_attention is None else self.flash_attention,
            rotation_policy=self.policy or profile.rotation_policy,
        )
        filled = replace(self, threads=effective.threads, batch=effective.batch, ubatch=effective.ubatch,
                         kv_cache_type=effective.kv_cache_type, flash_attention=effective.flash_attention,
                         policy=effective.rotation_policy)
        return effective, filled

    def to_json(self) -> dict[str, object]:
        def plain(v: object) -> object:
            return str(v) if isinstance(v, Path) else [str(e) for e in v] if isinstance(v, tuple) else v

        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

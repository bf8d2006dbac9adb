"""`rotary bench`: prompt and decode speed, peak VRAM and host RSS for each placement, in one process."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rotary_gguf import runtime
from rotary_gguf.gguf import ModelIndex, open_index
from rotary_gguf.plan import STRATEGIES, Placement, plan_placement
from rotary_gguf.profile import Profile
from rotary_gguf.telemetry import PeakSampler
from rotary_gguf.trace import TraceHeader, TraceWriter, read_trace

_ROTARY_TOP_LEVEL = ("hit_rate", "expert_reads_device", "expert_reads_host")
# Prose, code and chat, repeated to the asked prompt length.
_PROMPT_TEXT = (
    "<|im_start|>user\nThe licensee may copy and distribute verbatim copies of the program's source code "
    "as received, in any medium.\ndef main(argv):\n    for name in sorted(argv):\n        print(name)\n"
    "<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class PlacementResult:
    name: str
    placement: Placement
    prompt_tokens: int
    decode_tokens: int
    prompt_tok_s: float
    decode_tok_s: float
    peak_vram_bytes: int | None
    peak_rss_bytes: int
    rss_delta_bytes: int  # peak RSS minus RSS before the model was loaded
    load_seconds: float
    buffers: tuple[runtime.Buffer, ...]
    rotary: dict[str, Any] | None = None  # the scheduler's decode statistics (rotary placement)

    def to_json(self) -> dict[str, Any]:
        extra = {"rotary": self.rotary, **{k: self.rotary[k] for k in _ROTARY_TOP_LEVEL}} if self.rotary else {}
        return {**extra,
            "name": self.name, "prompt_tokens": self.prompt_tokens, "decode_tokens": self.decode_tokens,
            "prompt_tok_s": round(self.prompt_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
            "peak_vram_bytes": self.peak_vram_bytes, "peak_rss_bytes": self.peak_rss_bytes,
            "rss_delta_bytes": self.rss_delta_bytes,
            "predicted_vram_bytes": self.placement.predicted_vram_bytes,
            "predicted_host_bytes": self.placement.predicted_host_bytes,
            "gpu_expert_layers": list(self.placement.gpu_expert_layers), "load_seconds": round(self.load_seconds, 2),
            "buffers": [{"kind": b.kind, "name": b.name, "bytes": b.nbytes} for b in self.buffers],
        }


@dataclass(frozen=True)
class BenchResult:
    model: Path
    profile: Profile
    vram_budget_bytes: int
    gpu: str | None
    placements: tuple[PlacementResult, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # placement -> why it was not run

    def to_json(self) -> dict[str, Any]:
        return {"model": str(self.model), "profile": self.profile.name, "vram_budget_bytes": self.vram_budget_bytes,
                "gpu": self.gpu, "placements": [p.to_json() for p in self.placements], "skipped": self.skipped}


def prompt_ids(llm: Any, n_tokens: int) -> list[int]:
    """Exactly n_tokens of text tokens."""
    ids = llm.tokenize(_PROMPT_TEXT.encode(), add_bos=False, special=True)
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


@dataclass(frozen=True)
class RotaryOptions:
    """How the rotary placement runs in a benchmark: rotation policy (None: the profile's), copy budget
    (None: from the profile's PCIe bandwidth), a trace to record, a trace whose routing to replay."""

    policy: str | None = None
    budget_bytes: int | None = None
    trace_out: Path | None = None
    replay: Path | None = None


def bench_placement(path: Path, placement: Placement, profile: Profile, *, prompt_tokens: int, decode_tokens: int,
                    threads: int | None, repack: bool, rotary: RotaryOptions = RotaryOptions()) -> PlacementResult:
    """Load with one placement, evaluate a prompt and decode greedily, sampling peak RSS and VRAM."""
    writer = replay = None
    if placement.strategy == "rotary":
        replay = read_trace(rotary.replay) if rotary.replay else None
        if rotary.trace_out:
            writer = TraceWriter(rotary.trace_out, TraceHeader.for_model(open_index(path), "rotary bench"))
    rotation = runtime.rotation_options(profile, policy=rotary.policy, budget_bytes=rotary.budget_bytes,
                                        trace=writer) | {"replay": replay}
    with writer or contextlib.nullcontext(), PeakSampler() as peak:
        model = runtime.load(path, placement, rotation=rotation,
                             **runtime.context_options(placement, profile, threads=threads, repack=repack))
        try:
            ids = prompt_ids(model.llm, prompt_tokens)
            generation = runtime.generate_ids(model.llm, ids, decode_tokens, ignore_eos=True,
                                              residency=model.residency)
            stats = rotary_stats(model.residency) if model.residency else None
        finally:
            model.llm.close()
    if stats is not None:
        kind = "synthetic" if replay and replay.header.synthetic else "recorded"
        stats["routing"] = (f"replayed from {rotary.replay.name} ({kind} trace; outputs are not the model's)"
                            if replay else "the model's own")
    return PlacementResult(
        placement.strategy, placement, generation.prompt_tokens, len(generation.tokens),
        generation.prompt_tokens_per_second, generation.decode_tokens_per_second, peak.peak_vram, peak.peak_rss,
        peak.peak_rss - model.rss_before_load, model.load_seconds, model.buffers, stats,
    )


def rotary_stats(rotation: Any) -> dict[str, Any]:
    """The scheduler's counters for the decode: expert reads served from the slots vs from host memory, and
    what rotation copied."""
    layers = rotation.layer_stats()
    device = sum(s.device_pairs for s in layers)
    host = sum(s.host_pairs for s in layers)
    plugin = rotation.plugin.stats()
    tokens = max(1, len(rotation.rotator.copied_per_token))
    return {"hit_rate": round(device / (device + host), 4) if device + host else 0.0,
            "expert_reads_device": device, "expert_reads_host": host,
            "policy": rotation.rotator.policy.name if rotation.rotate else "none (static)",
            "admissions": sum(s.admissions for s in layers), "evictions": sum(s.evictions for s in layers),
            "bytes_copied": sum(s.bytes_copied for s in layers),
            "bytes_copied_per_token": round(sum(s.bytes_copied for s in layers) / tokens),
            "copy_stall_ms": round(plugin["stall_ns"] / 1e6, 3),
            "slots": {str(layer): n for layer, n in rotation.slots.items()},
            "device": rotation.plugin.description,
            "per_layer_hit_rate": {str(s.layer): round(s.hit_rate, 4) for s in layers},
            "per_layer": {str(s.layer): {"hits": s.device_pairs, "misses": s.host_pairs, "admissions": s.admissions,
                                         "evictions": s.evictions, "bytes_copied": s.bytes_copied} for s in layers}}


def run_bench(path: Path, index: ModelIndex, profile: Profile, *, strategies: tuple[str, ...] = STRATEGIES,
              vram_budget: int | None = None, ctx: int | None = None, prompt_tokens: int = 512,
              decode_tokens: int = 128, threads: int | None = None, repack: bool = False,
              skipped: dict[str, str] | None = None, rotary: RotaryOptions = RotaryOptions(),
              progress: Callable[[int, str], None] | None = None) -> BenchResult:
    """Benchmark each strategy on the same model and profile, one after the other in this process.

    `progress(done, name)` is called before each placement starts."""
    if ctx is not None and prompt_tokens + decode_tokens > ctx:
        raise runtime.ContextError(f"{prompt_tokens} prompt + {decode_tokens} decoded tokens do not fit ctx {ctx}")
    ctx = ctx or max(profile.ctx, prompt_tokens + decode_tokens)
    results = []
    placements = [plan_placement(index, profile, strategy=s, vram_budget=vram_budget, ctx=ctx) for s in strategies]
    for done, placement in enumerate(placements):
        if progress:
            progress(done, placement.strategy)
        results.append(bench_placement(path, placement, profile, prompt_tokens=prompt_tokens,
                                       decode_tokens=decode_tokens, threads=threads, repack=repack, rotary=rotary))
    return BenchResult(path, profile, placements[0].vram_budget_bytes, runtime.gpu_device_name(), tuple(results),
                       dict(skipped or {}))

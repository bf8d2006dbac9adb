"""The embedded default job: synthesize a MoE model into the cache, index it, generate through llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rotary_gguf.cache import cache_dir
from rotary_gguf.gguf import ModelIndex
from rotary_gguf.runtime import Engine, EngineOptions, Generation
from rotary_gguf.synth import PRESET_DEFAULT_TYPE, PRESETS, synth_model
from rotary_gguf.synth.writer import Progress

DEMO_PROMPT = "<|im_start|>user\nWhich experts does this token need?<|im_end|>\n<|im_start|>assistant\n"
# Bump when synth output changes, so cached demo models are rebuilt.
SYNTH_REVISION = 1


@dataclass(frozen=True)
class DemoResult:
    model: Path
    synthesized: bool
    index: ModelIndex
    placement: str
    notes: tuple[str, ...]
    generation: Generation


def cached_synth_model(preset: str, seed: int = 0, progress: Progress | None = None) -> tuple[Path, bool]:
    """Path of the preset's synthetic model in the cache, writing it first if missing; (path, written)."""
    qtype = PRESET_DEFAULT_TYPE[preset]
    path = cache_dir() / f"synth-{preset}-{qtype}-seed{seed}-r{SYNTH_REVISION}.gguf"
    if path.exists():
        return path, False
    synth_model(path, PRESETS[preset], qtype, seed=seed, description=f"rotary synth {preset}", progress=progress)
    return path, True


def run_demo(preset: str = "small", n_tokens: int = 16, progress: Progress | None = None) -> DemoResult:
    """Synthesize (or reuse) the preset's model and generate n_tokens greedily through the engine, with the
    machine's own profile and the placement it picks."""
    path, written = cached_synth_model(preset, progress=progress)
    with Engine.open(path, "auto", "auto", EngineOptions(ctx=512)) as engine:
        engine.index.require_moe()
        generation = engine.complete(DEMO_PROMPT, n_tokens)
        return DemoResult(path, written, engine.index, engine.placement.strategy, engine.notes, generation)

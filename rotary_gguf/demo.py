"""The embedded default job: synthesize a MoE model into the cache, index it, generate through llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rotary_gguf import runtime
from rotary_gguf.cache import cache_dir
from rotary_gguf.gguf import ModelIndex, open_index
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
    generation: runtime.Generation


def cached_synth_model(preset: str, seed: int = 0, progress: Progress | None = None) -> tuple[Path, bool]:
    """Path of the preset's synthetic model in the cache, writing it first if missing; (path, written)."""
    qtype = PRESET_DEFAULT_TYPE[preset]
    path = cache_dir() / f"synth-{preset}-{qtype}-seed{seed}-r{SYNTH_REVISION}.gguf"
    if path.exists():
        return path, False
    synth_model(path, PRESETS[preset], qtype, seed=seed, description=f"rotary synth {preset}", progress=progress)
    return path, True


def run_demo(preset: str = "small", n_tokens: int = 16, progress: Progress | None = None) -> DemoResult:
    """Synthesize (or reuse) the preset's model, index it and generate n_tokens greedily on the CPU."""
    path, written = cached_synth_model(preset, progress=progress)
    index = open_index(path).require_moe()
    llm = runtime.load(path).llm
    generation = runtime.generate(llm, DEMO_PROMPT, n_tokens)
    return DemoResult(path, written, index, generation)

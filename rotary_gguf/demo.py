"""The embedded default job: the shipped code model (or a synthetic one) indexed, then a completion
generated through llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rotary_gguf.cache import cache_dir
from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex
from rotary_gguf.runtime import Engine, EngineOptions, Generation
from rotary_gguf.synth import PRESET_DEFAULT_TYPE, PRESETS, synth_model
from rotary_gguf.synth.writer import Progress

# The shipped model: a small Qwen3-MoE trained on the Python standard library (scripts/train_tiny_moe.py,
# built by scripts/build_tiny_moe.py; licence note beside it).
SHIPPED_MODEL = Path(__file__).resolve().parent / "data" / "models" / "stdlib-moe-q8_0.gguf"
CODE_PROMPT = "def fibonacci(n):\n"
CHAT_PROMPT = "<|im_start|>user\nWhich experts does this token need?<|im_end|>\n<|im_start|>assistant\n"
# Bump when synth output changes, so cached demo models are rebuilt.
SYNTH_REVISION = 1


class DemoError(RotaryError):
    """The demo cannot run (its model is missing)."""


@dataclass(frozen=True)
class DemoResult:
    model: Path
    synthesized: bool
    prompt: str
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


def shipped_model() -> Path:
    """The shipped model's path (DemoError if this installation lacks it)."""
    if not SHIPPED_MODEL.is_file():
        raise DemoError(f"the shipped model is missing from this installation ({SHIPPED_MODEL}); reinstall "
                        "rotary-gguf, or run `rotary demo --synthetic small`")
    return SHIPPED_MODEL


def run_demo(synthetic: str | None = None, n_tokens: int = 48, prompt: str | None = None,
             progress: Progress | None = None) -> DemoResult:
    """Generate n_tokens greedily after `prompt` through the engine, with the machine's own profile and the
    placement it picks: on the shipped code model, or on a synthetic preset's model (synthesized into the
    cache on first use; random weights, so its text is noise)."""
    if synthetic is None:
        path, written = shipped_model(), False
    else:
        path, written = cached_synth_model(synthetic, progress=progress)
    if prompt is None:
        prompt = CODE_PROMPT if synthetic is None else CHAT_PROMPT
    with Engine.open(path, "auto", "auto", EngineOptions(ctx=512)) as engine:
        engine.index.require_moe()
        generation = engine.complete(prompt, n_tokens)
        return DemoResult(path, written, prompt, engine.index, engine.placement.strategy, engine.notes, generation)

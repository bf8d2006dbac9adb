"""Routing calibration: how often each layer selects each expert, over a small mixed prompt set.

The counts come from the scheduler plugin's own counters (a C-level count per MoE block, no eval callback),
with no expert slots, so collection costs what the plugin costs (README: within noise of llama.cpp
alone). Prompt and generated tokens are counted separately. The result is a sidecar JSON next to the
model (`MODEL.rotary.json`) that records the model file's size and header checksum, so that a sidecar
left beside a changed model is detected; rotary-aware GGUFs carry the same popularity as metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rotary_gguf import runtime
from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex
from rotary_gguf.plan import plan_placement
from rotary_gguf.profile import Profile
from rotary_gguf.report import pyplot, save_png
from rotary_gguf.trace import TraceHeader, TraceWriter

SIDECAR_FORMAT = "rotary-calibration"
SIDECAR_VERSION = 1
# Prose, code and chat: the built-in calibration set.
BUILTIN_PROMPTS = (
    "The history of the river valley begins with the glaciers that carved it, and with the farmers who "
    "followed them north when the ice withdrew.",
    "def merge_sorted(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n",
    "<|im_start|>user\nCan you explain how a hash map handles collisions?<|im_end|>\n<|im_start|>assistant\n",
    "SELECT customers.name, COUNT(orders.id) FROM customers JOIN orders ON orders.customer_id = customers.id",
    "<|im_start|>user\nWrite a short poem about the sea at night.<|im_end|>\n<|im_start|>assistant\n",
    "Theorem. Every bounded monotone sequence of real numbers converges. Proof. Let (a_n) be increasing and",
)


class CalibrationError(RotaryError):
    """Calibration cannot run, or a sidecar does not belong to its model."""


@dataclass(frozen=True)
class Calibration:
    """Per-layer expert selection counts over a calibration set."""

    model_file: str
    model_size: int
    header_sha256: str
    description: str
    prompts: int
    prompt_tokens: int
    generated_tokens: int
    prompt_counts: dict[int, tuple[int, ...]]
    generated_counts: dict[int, tuple[int, ...]]

    def popularity(self) -> dict[int, np.ndarray]:
        """Each layer's share of selections per expert (prompt and generated tokens together)."""
        out = {}
        for layer, counts in self.prompt_counts.items():
            total = np.asarray(counts, float) + np.asarray(self.generated_counts.get(layer, counts), float)
            out[layer] = total / total.sum() if total.sum() else np.full(len(total), 1 / len(total))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
                "model": {"file": self.model_file, "size": self.model_size, "header_sha256": self.header_sha256},
                "calibration": {"description": self.description, "prompts": self.prompts,
                                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens},
                "layers": {str(layer): {"prompt": list(self.prompt_counts[layer]),
                                        "generated": list(self.generated_counts[layer])}
                           for layer in sorted(self.prompt_counts)}}


def header_checksum(index: ModelIndex) -> str:
    """SHA-256 of the first file's bytes before its tensor data (header, metadata, tensor infos)."""
    first = [t.offset for t in index.tensors if t.file == 0]
    end = min(first) if first else index.path.stat().st_size
    digest = hashlib.sha256()
    with open(index.files[0] if index.files else index.path, "rb") as f:
        while end > 0:
            chunk = f.read(min(end, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            end -= len(chunk)
    return digest.hexdigest()


def sidecar_path(model: Path) -> Path:
    return model.with_name(model.name + ".rotary.json")


def read_prompts(path: Path | None) -> tuple[list[str], str]:
    """Prompts from a file (blank-line separated, or JSON list of strings), else the built-in set."""
    if path is None:
        return list(BUILTIN_PROMPTS), "built-in mixed set (prose, code, chat, SQL, maths)"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read prompts: {exc}") from None
    try:
        prompts = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: not a JSON list of prompts: {exc}") from None
    if prompts is None:
        prompts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise CalibrationError(f"{path}: no prompts (blank-line separated text, or a JSON list of strings)")
    return prompts, f"{len(prompts)} prompts from {path.name}"


def calibrate(path: Path, index: ModelIndex, profile: Profile, *, prompts_file: Path | None = None,
              tokens: int = 64, trace_out: Path | None = None, threads: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Run every prompt and `tokens` greedy tokens after it, counting each layer's expert selections."""
    index.require_moe()
    prompts, description = read_prompts(prompts_file)
    try:
        runtime.scheduler_plugin(device_fallback="cpu")
    except runtime.PluginError as exc:
        raise CalibrationError(f"calibration counts routing with the scheduler plugin: {exc}") from None
    base = plan_placement(index, profile, strategy="rotary")
    placement = replace(base, expert_slots=tuple((layer, 0) for layer in index.moe_layers), slot_bytes=0)
    counts = {phase: {layer: np.zeros(index.params.n_expert, np.int64) for layer in index.moe_layers}
              for phase in ("prompt", "decode")}
    writer = TraceWriter(trace_out, TraceHeader.for_model(index, description)) if trace_out else None
    # No per-token work unless a trace is asked for: the plugin's own counters, read at each phase's end.
    rotation = {"trace": writer, "rotate": False, "device_fallback": "cpu", "max_batch": 0}
    n_prompt = n_generated = 0
    with writer or contextlib.nullcontext():
        model = runtime.load(path, placement, rotation=rotation,
                             **runtime.context_options(placement, profile, threads=threads))
        phases = _PhaseCounts(model.residency, counts)
        try:
            for done, prompt in enumerate(prompts):
                if progress:
                    progress(done, len(prompts))
                ids = model.llm.tokenize(prompt.encode(), add_bos=False, special=True)
                g = runtime.generate_ids(model.llm, ids, tokens, ignore_eos=True, residency=phases)
                phases.add("decode")
                n_prompt, n_generated = n_prompt + len(ids), n_generated + len(g.tokens)
        finally:
            model.llm.close()
    if progress:
        progress(len(prompts), len(prompts))
    as_tuples = {phase: {layer: tuple(int(x) for x in c) for layer, c in by_layer.items()}
                 for phase, by_layer in counts.items()}
    return Calibration(index.path.name, index.file_size, header_checksum(index), description, len(prompts),
                       n_prompt, n_generated, as_tuples["prompt"], as_tuples["decode"])


class _PhaseCounts:
    """Stands in for a model's rotation during calibration: reads the plugin's per-layer counters when the
    prompt ends (prompt counts) and when the caller says the decode ended, resetting them each time."""

    def __init__(self, rotation: Any, counts: dict[str, dict[int, np.ndarray]]) -> None:
        self.rotation, self.counts = rotation, counts

    def add(self, phase: str) -> None:
        plugin = self.rotation.plugin
        for layer, total in self.counts[phase].items():
            total += np.asarray(plugin.layer_stats(layer).counts, dtype=np.int64)
        plugin.reset_stats()

    def before_prompt(self) -> None:
        self.rotation.before_prompt()

    def after_prompt(self) -> None:
        self.add("prompt")
        self.rotation.after_prompt()

    def after_token(self) -> None:
        if self.rotation.recording:
            self.rotation.after_token()


def write_sidecar(calibration: Calibration, out: Path) -> Path:
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(calibration.to_json(), indent=1))
    os.replace(part, out)
    return out


def read_sidecar(path: Path, index: ModelIndex | None = None) -> Calibration:
    """A sidecar, checked against the model when given (size and header checksum)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != SIDECAR_FORMAT or data.get("version") != SIDECAR_VERSION:
            raise CalibrationError(f"{path}: not a rotary calibration sidecar (version {SIDECAR_VERSION})")
        layers = {int(k): v for k, v in data["layers"].items()}
        cal = Calibration(data["model"]["file"], int(data["model"]["size"]), data["model"]["header_sha256"],
                          data["calibration"]["description"], int(data["calibration"]["prompts"]),
                          int(data["calibration"]["prompt_tokens"]), int(data["calibration"]["generated_tokens"]),
                          {k: tuple(map(int, v["prompt"])) for k, v in layers.items()},
                          {k: tuple(map(int, v["generated"])) for k, v in layers.items()})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CalibrationError(f"{path}: unreadable calibration sidecar ({type(exc).__name__}: {exc})") from None
    if index is not None and (cal.model_size != index.file_size or cal.header_sha256 != header_checksum(index)):
        raise CalibrationError(f"{path}: stale calibration: it was made for another version of {cal.model_file} "
                               "(size or header checksum differ); run `rotary calibrate` again")
    return cal


def plot_heatmap(calibration: Calibration, out: Path) -> Path:
    """Layers x experts popularity (share of the layer's selections, relative to uniform) as a PNG."""
    plt = pyplot()
    popularity = calibration.popularity()
    layers = sorted(popularity)
    grid = np.stack([popularity[layer] * len(popularity[layer]) for layer in layers])
    figure, axes = plt.subplots(figsize=(min(14, 4 + grid.shape[1] / 10), min(10, 2 + len(layers) / 5)))
    image = axes.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    axes.set(xlabel="expert", ylabel="layer", title=f"{calibration.model_file}: expert popularity x uniform "
             f"({calibration.prompt_tokens} prompt + {calibration.generated_tokens} generated tokens)")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers] if len(layers) <= 24 else None)
    figure.colorbar(image, ax=axes, label="selections / uniform share")
    return save_png(figure, out)

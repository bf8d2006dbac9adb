"""Routing calibration: how often each layer selects each expert, over a small mixed prompt set.

The counts come from the scheduler plugin's record of each step's routing (kept in C per MoE block, no
eval callback), with no expert slots. Prompt and generated tokens are counted separately. The result
(rotary_gguf.calibration.Calibration) is written as a sidecar next to the model or embedded in a
rotary-aware GGUF.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rotary_gguf.calibration import Calibration, CalibrationError, header_checksum
from rotary_gguf.profile import Profile
from rotary_gguf.report import pyplot, save_png
from rotary_gguf.runtime import Engine, EngineOptions, PluginError, prepare

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


def calibrate(path: Path, profile: Profile | str, *, prompts_file: Path | None = None, tokens: int = 64,
              trace_out: Path | None = None, threads: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Run every prompt and `tokens` greedy tokens after it, counting each layer's expert selections."""
    prompts, description = read_prompts(prompts_file)
    options = EngineOptions(threads=threads, routing_only=True, trace=trace_out, trace_description=description)
    setup = prepare(path, profile, "rotary", options)
    index = setup.index.require_moe()
    counts = {phase: {layer: np.zeros(index.params.n_expert, np.int64) for layer in index.moe_layers}
              for phase in ("prompt", "decode")}

    def count(phase: str, routing: dict[int, np.ndarray]) -> None:
        for layer, ids in routing.items():
            counts[phase][layer] += np.bincount(ids, minlength=index.params.n_expert)

    try:
        engine = Engine.from_setup(setup)
    except PluginError as exc:
        raise CalibrationError(f"calibration counts routing with the scheduler plugin: {exc}") from None
    n_prompt = n_generated = 0
    with engine:
        engine.rotation.watch(count)
        for done, prompt in enumerate(prompts):
            if progress:
                progress(done, len(prompts))
            g = engine.complete(prompt, tokens, ignore_eos=True)
            n_prompt, n_generated = n_prompt + g.prompt_tokens, n_generated + len(g.tokens)
    if progress:
        progress(len(prompts), len(prompts))
    as_tuples = {phase: {layer: tuple(int(x) for x in c) for layer, c in by_layer.items()}
                 for phase, by_layer in counts.items()}
    return Calibration(index.path.name, index.file_size, header_checksum(index), description, len(prompts),
                       n_prompt, n_generated, as_tuples["prompt"], as_tuples["decode"])


def plot_heatmap(calibration: Calibration, out: Path) -> Path:
    """Layers x experts popularity (share of the layer's selections, relative to uniform) as a PNG."""
    plt = pyplot()
    popularity = calibration.popularity()
    layers = sorted(popularity)
    grid = np.stack([popularity[layer] * len(popularity[layer]) for layer in layers])
    figure, axes = plt.subplots(figsize=(min(14, 4 + grid.shape[1] / 10), min(10, 2 + len(layers) / 5)))
    image = axes.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    axes.set(xlabel="expert", ylabel="layer", title=f"{calibration.model_file}: expert popularity x uniform\n"
             f"({calibration.prompt_tokens} prompt + {calibration.generated_tokens} generated tokens)")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers] if len(layers) <= 24 else None)
    figure.colorbar(image, ax=axes, label="selections / uniform share")
    return save_png(figure, out)

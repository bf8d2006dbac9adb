"""Commands about model files: inspect, synth, synth-hf, and the embedded demo."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rotary_gguf.cli import Failure, LazyBar, main
from rotary_gguf.report import format_bytes, format_index
from rotary_gguf.synth import ARCHITECTURES, HYBRID_ARCHITECTURES, PRESET_DEFAULT_TYPE, PRESETS, TYPE_NAMES

HF_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with every expert block).")
def inspect(model: Path, as_json: bool) -> None:
    """Show what MODEL holds: parameters, bytes per tensor class, per-expert block sizes.

    Reads headers only; tensor data stays in the memory map.
    """
    from rotary_gguf.calibration import load_calibration
    from rotary_gguf.gguf import open_index

    index = open_index(model).require_moe()
    calibration, source = load_calibration(index)
    if as_json:
        extra = {"calibration": {"source": source, **calibration.to_json()["calibration"]} if calibration
                 else {"source": None, "reason": source},
                 "rotary_metadata": {k: v for k, v in index.metadata.items() if k.startswith("rotary.")
                                     and ".prompt_counts." not in k and ".generated_counts." not in k}}
        click.echo(json.dumps(index.to_json() | extra))
        return
    click.echo(format_index(index))
    if calibration:
        top = max(float(p.max()) * len(p) for p in calibration.popularity().values())
        click.echo(f"calibration    from {source}: {calibration.description}; {calibration.prompts} prompts, "
                   f"{calibration.prompt_tokens} prompt + {calibration.generated_tokens} generated tokens; most "
                   f"popular expert {top:.1f}x uniform")
    else:
        click.echo(f"calibration    {source}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Model shapes: tiny (tests), small (CPU benchmarks), qwen35moe-tiny and gemma4-tiny (tests of "
                   "those layouts); real shapes: qwen3-30b-a3b (~17 GB), qwen3.6-35b-a3b (~20 GB), "
                   "gemma4-26b-a4b (~18 GB).")
@click.option("--type", "qtype", type=click.Choice(sorted(TYPE_NAMES)), default=None,
              help="ggml type of the weights [default: f32 for the tiny presets, q4_k otherwise].")
@click.option("--arch", type=click.Choice(ARCHITECTURES + HYBRID_ARCHITECTURES), default=None,
              help="Tensor layout [default: the preset's]: qwen3moe, qwen2moe (shared expert), llama (Mixtral), "
                   "olmoe, gpt-oss (biases) lay out any of their presets; qwen35moe (Gated DeltaNet hybrid) and "
                   "gemma4 (sliding + full attention) come from their own presets.")
@click.option("--sparse", is_flag=True,
              help="Write the header and leave the tensor data as a hole (a few MB on disk): the file indexes, "
                   "plans and passes llama.cpp's dry run like the real model, but holds zeros and cannot "
                   "produce meaningful text.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def synth(out: Path, preset: str, qtype: str | None, arch: str | None, sparse: bool, seed: int, force: bool) -> None:
    """Write a synthetic random-weight MoE GGUF that llama.cpp loads and runs."""
    from rotary_gguf.synth import synth_model
    from rotary_gguf.synth.spec import for_arch

    if out.exists() and not force:
        raise Failure(f"{out}: exists; pass --force to overwrite")
    spec = for_arch(PRESETS[preset], arch or PRESETS[preset].arch)
    bar = LazyBar(f"writing {out.name}")
    try:
        result = synth_model(out, spec, qtype or PRESET_DEFAULT_TYPE[preset], seed=seed, sparse=sparse,
                             description=f"rotary synth {preset} {spec.arch}", progress=bar)
    finally:
        bar.close()
    what = "header only, data left as a hole" if sparse else f"seed {seed}"
    click.echo(f"wrote {result.path} ({format_bytes(result.nbytes)}, preset {preset}, {spec.arch}, "
               f"{result.qtype.name}, {what}) in {result.seconds:.1f} s")


@main.command("synth-hf")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--model-type", type=click.Choice(HF_MODEL_TYPES), default="qwen3_moe", show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default="bf16", show_default=True)
@click.option("--config-style", type=click.Choice(["v4", "v5"]), default="v4", show_default=True,
              help="transformers 4.x keys (num_experts, rope_theta, torch_dtype) or 5.x keys.")
@click.option("--shards", type=int, default=1, show_default=True, help="Number of safetensors files.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth_hf(out_dir: Path, model_type: str, dtype: str, config_style: str, shards: int, seed: int) -> None:
    """Write a tiny random HF checkpoint (config.json, safetensors, tokenizer) for converter tests."""
    from rotary_gguf.synth.hf import write_hf_checkpoint

    files = write_hf_checkpoint(out_dir, model_type, dtype=dtype, config_style=config_style,
                                shards=shards, seed=seed)
    click.echo(f"wrote {out_dir}: {', '.join(sorted(f.name for f in files))}")


@main.command()
@click.option("--prompt", default=None,
              help="Text to complete [default: a Python function header; a chat turn with --synthetic].")
@click.option("--tokens", "n_tokens", type=click.IntRange(1, 4096), default=48, show_default=True)
@click.option("--synthetic", type=click.Choice(["tiny", "small"]), default=None,
              help="Run a synthetic random-weight model (written into the cache once) instead of the shipped one.")
def demo(prompt: str | None, n_tokens: int, synthetic: str | None) -> None:
    """The embedded default: the shipped code model (a small MoE trained on the Python standard library)
    indexed, then a completion generated on llama.cpp."""
    from rotary_gguf.demo import run_demo

    bar = LazyBar("synthesizing the demo model")
    try:
        result = run_demo(synthetic, n_tokens, prompt, progress=bar)
    finally:
        bar.close()
    g = result.generation
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    origin = "shipped" if synthetic is None else "synthesized" if result.synthesized else "cached"
    click.echo(f"{origin} {result.model}\n")
    click.echo(format_index(result.index))
    click.echo(f"\nllama.cpp ({result.placement} placement) prompt {g.prompt_tokens} tokens in "
               f"{g.prompt_seconds * 1000:.0f} ms; generated {len(g.tokens)} tokens at "
               f"{g.decode_tokens_per_second:.1f} tok/s"
               + (" (stopped at end-of-generation)" if g.stopped_at_eos else ""))
    if synthetic is not None:
        click.echo(f"text (random weights, so noise): {g.text!r}")
        return
    rule = "-" * 60
    click.echo(f"greedy completion (prompt, then the model's text):\n{rule}\n{result.prompt}{g.text}\n{rule}")

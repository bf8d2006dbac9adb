"""`rotary convert`: an HF MoE checkpoint to (rotary-aware) GGUF."""

from __future__ import annotations

from pathlib import Path

import click

from rotary_gguf.cli import LazyBar, main


@main.command()
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--type", "type_name", default="f16", show_default=True,
              help="f32, f16, bf16, q8_0 (written directly) or a llama.cpp type such as q4_k_m, q5_k_m, q6_k.")
@click.option("--calibrate", "prompts", default=None, metavar="PROMPTS",
              help="Also calibrate routing (PROMPTS: a prompt file, or 'builtin') and write a rotary-aware GGUF.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def convert(hf_dir: Path, output: Path, type_name: str, prompts: str | None, force: bool) -> None:
    """Convert the HF checkpoint in HF_DIR (qwen3_moe, qwen2_moe, mixtral, olmoe, gpt_oss, qwen3_5_moe, glm4_moe,
    gemma4) to GGUF, without torch."""
    from rotary_gguf.convert import ConvertError
    from rotary_gguf.convert import convert as run

    if output.exists() and not force:
        raise ConvertError(f"{output} exists; use --force to overwrite")
    target = output if prompts is None else output.with_name(output.name + ".uncalibrated")
    bar = LazyBar("converting")
    try:
        run(hf_dir, target, type_name, force=True, progress=lambda done, total: bar(done, total))
    finally:
        bar.close()
    if prompts is not None:
        _calibrate_into(target, output, None if prompts == "builtin" else Path(prompts))
    click.echo(f"wrote {output}")


def _calibrate_into(model: Path, output: Path, prompts: Path | None) -> None:
    from rotary_gguf.calibrate import calibrate
    from rotary_gguf.embed import embed
    from rotary_gguf.gguf import open_index

    try:
        result = calibrate(model, "auto", prompts_file=prompts)
        embed(open_index(model), result, output, force=True)
    finally:
        model.unlink(missing_ok=True)

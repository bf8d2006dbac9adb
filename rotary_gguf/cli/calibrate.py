"""`rotary calibrate`: count each layer's expert routing over a prompt set."""

from __future__ import annotations

from pathlib import Path

import click

from rotary_gguf.cli import Failure, LazyBar, main


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Prompts: blank-line separated text or a JSON list [default: a built-in mixed set].")
@click.option("--tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens generated after each prompt.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Sidecar to write [default: MODEL.rotary.json].")
@click.option("--trace", "trace_out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the routing as a trace (for `rotary simulate`).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Draw a layers x experts popularity heatmap (PNG; needs matplotlib).")
@click.option("--embed", is_flag=True, help="Write a rotary-aware GGUF (-o) instead of a sidecar.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The rotary-aware GGUF that --embed writes.")
@click.option("--force", is_flag=True, help="Overwrite the -o file if it exists.")
@click.option("--profile", "profile_name", default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
def calibrate(model: Path, prompts_file: Path | None, tokens: int, out: Path | None, trace_out: Path | None,
              plot: Path | None, embed: bool, output: Path | None, force: bool, profile_name: str,
              threads: int | None) -> None:
    """Count how often each layer of MODEL selects each expert, for prompt and generated tokens."""
    from rotary_gguf.calibrate import calibrate as run
    from rotary_gguf.calibrate import plot_heatmap
    from rotary_gguf.calibration import routing_summary, sidecar_path, write_sidecar
    from rotary_gguf.embed import embed as write_gguf
    from rotary_gguf.gguf import open_index

    if embed != (output is not None):
        raise Failure("--embed and -o OUT.gguf go together")
    if output is not None and output.exists() and not force:
        raise Failure(f"{output} exists; use --force to overwrite")
    bar = LazyBar("calibrating")
    try:
        result = run(model, profile_name, prompts_file=prompts_file, tokens=tokens, trace_out=trace_out,
                     threads=threads, progress=bar)
    finally:
        bar.close()
    if embed:
        bar = LazyBar("writing")
        try:
            written = write_gguf(open_index(model), result, output, force=force,
                                 progress=lambda done, total: bar(done, total))
        finally:
            bar.close()
    else:
        written = write_sidecar(result, out or sidecar_path(model))
    click.echo(f"wrote {written} ({result.prompts} prompts, {result.prompt_tokens} prompt and "
               f"{result.generated_tokens} generated tokens; {result.description})")
    click.echo(routing_summary(result.routing()))
    if trace_out:
        click.echo(f"wrote {trace_out}")
    if plot:
        click.echo(f"wrote {plot_heatmap(result, plot)}")

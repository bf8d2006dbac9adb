"""`rotary perplexity`: llama.cpp's perplexity of a model over a text file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from rotary_gguf.cli import LazyBar, main
from rotary_gguf.cli.run import _model_options, _open, _placement_choice


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("file", type=click.Path(path_type=Path))
@_model_options
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="llama.cpp's --ppl-stride mode: windows of --ctx tokens every N tokens, each scoring its "
                   "last N tokens (llama.cpp's `-c C --ppl-stride N` is `--ctx C+N/2 --stride N`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_placement_choice()
def perplexity(model: Path, file: Path, profile_name: str, options, stride: int | None, as_json: bool,
               placement: str) -> None:
    """Perplexity of MODEL over the text in FILE, as llama.cpp's perplexity tool computes it.

    The text is split into windows of --ctx tokens [default: 512, at most the model's training context],
    each evaluated from an empty cache; the second half of each window is scored. A text needs at least
    --ctx tokens (llama.cpp asks for twice that). Ends with "Final estimate: PPL = X +/- Y"; see
    docs/perplexity.md.
    """
    from rotary_gguf.gguf import open_index
    from rotary_gguf.perplexity import check_stride, default_ctx, format_perplexity, read_text, text_perplexity

    text = read_text(file)
    if options.ctx is None:
        options = replace(options, ctx=default_ctx(open_index(model).params.n_ctx_train))
    check_stride(options.ctx, stride)
    bar = LazyBar("perplexity")
    try:
        with _open(model, profile_name, placement, options) as engine:
            result = text_perplexity(engine, text, options.ctx, stride, progress=bar, source=str(file))
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps({"model": str(model), "file": str(file), **result.to_json()}))
    else:
        click.echo(format_perplexity(result))

"""`rotary plugin build|status`: the native scheduler plugin."""

from __future__ import annotations

from pathlib import Path

import click

from rotary_gguf.cli import main


@main.group()
def plugin() -> None:
    """The rotary expert scheduler plugin (native/, built with CMake against the installed llama.cpp)."""


@plugin.command("build")
@click.option("--ggml-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The llama-cpp-python sdist's vendor/llama.cpp/ggml folder [default: fetched from the "
                   "package index and cached].")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True)
def plugin_build(ggml_dir: Path | None, jobs: int) -> None:
    """Compile the plugin for the installed llama-cpp-python and install it where rotary looks."""
    from rotary_gguf.plugin_build import build_plugin

    path = build_plugin(ggml_dir=ggml_dir, jobs=jobs, say=lambda text: click.echo(text, err=True))
    click.echo(f"built {path}")


@plugin.command("status")
def plugin_status() -> None:
    """Say whether --placement rotary can run here, and why not."""
    from rotary_gguf import runtime
    from rotary_gguf.plugin import plugin_path

    reason = runtime.rotary_unavailable()
    click.echo(f"plugin         {plugin_path()}")
    if reason is None:
        p = runtime.scheduler_plugin()
        click.echo(f"build          {p.build_info}")
        click.echo(f"device         {p.description}")
    else:
        click.echo(f"unavailable    {reason}")

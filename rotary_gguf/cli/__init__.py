"""The `rotary` command line: thin click commands over the library.

Library errors (RotaryError) become one line on stderr and exit status 2; nothing else is caught.
"""

from __future__ import annotations

import logging
import sys

import click

from rotary_gguf import __version__
from rotary_gguf.errors import RotaryError


class Failure(click.ClickException):
    """A user-facing error: one line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"rotary: error: {self.format_message()}", err=True)


def size_option(value: str | None, flag: str) -> int | None:
    """A size flag's bytes (6GiB, 6500MiB, 123B), None when not given; a bad value is a Failure."""
    from rotary_gguf.profile import parse_size

    if value is None:
        return None
    try:
        return parse_size(value, flag)
    except ValueError as exc:
        raise Failure(str(exc)) from None


class LazyBar:
    """A click progress bar on stderr, shown from the first report on (so an early error stays one line).

    Call it as progress(done, total[, item]); close() when the work ends."""

    def __init__(self, label: str) -> None:
        self.label, self.bar, self.done = label, None, 0

    def __call__(self, done: int, total: int, item: str | None = None) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_eta=True,
                                         show_percent=True, item_show_func=lambda name: name)
            self.bar.__enter__()
        self.bar.update(done - self.done, item)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RotaryError as exc:
            raise Failure(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="rotary")
@click.option("-v", "--verbose", is_flag=True, help="Log details (llama.cpp's own log included) to stderr.")
def main(verbose: bool) -> None:
    """Run large Mixture-of-Experts GGUF models on small GPUs."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")


from rotary_gguf.cli import calibrate, convert, model, perplexity, plugin, rotation, rpc, run, serve  # noqa: E402,F401  (register commands)

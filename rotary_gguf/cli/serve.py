"""`rotary serve`: the OpenAI-compatible local server."""

from __future__ import annotations

from pathlib import Path

import click

from rotary_gguf.cli import Failure, main
from rotary_gguf.cli.run import _model_options, _open, _placement_choice


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@_model_options
@_placement_choice()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; use --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port (0: any free port, printed at start).")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics.")
@click.option("--alias", default=None, help="The model's name for clients [default: the file name without .gguf].")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait while one runs; more get 429 with Retry-After.")
def serve(model: Path, profile_name: str, options, placement: str, host: str, port: int, api_key: str | None,
          alias: str | None, max_queue: int) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API until Ctrl-C.

    /v1/chat/completions (the GGUF's chat template), /v1/completions, /v1/models, /health, /metrics
    (Prometheus), and at / a web page with a chat box and a live view of the expert cache. Requests run one
    at a time, in arrival order.
    """
    from rotary_gguf import server

    if api_key is not None and not api_key.strip():
        raise Failure("--api-key must not be empty")
    name = alias if alias is not None else model.name.removesuffix(".gguf")
    if not name.strip():
        raise Failure("--alias must not be empty")
    try:
        _serve(model, profile_name, placement, options, host, port, api_key, name, max_queue, server)
    except KeyboardInterrupt:
        click.echo("rotary serve: stopped", err=True)


def _serve(model, profile_name, placement, options, host, port, api_key, name, max_queue, server) -> None:
    from rotary_gguf.template import TemplateError

    sock = server.listen(host, port)
    with sock, _open(model, profile_name, placement, options) as engine:
        try:
            engine.chat_template()  # compiled and probed now, on the main thread (a render time limit holds here)
        except TemplateError as exc:
            click.echo(f"note: {exc}; /v1/chat/completions will answer 400", err=True)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            click.echo(f"note: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
        click.echo(f"rotary serve: {name} ({engine.placement.strategy}, ctx {engine.context_size}) at "
                   f"http://{shown}:{bound}/ - OpenAI API under /v1; Ctrl-C stops", err=True)
        server.serve(engine, sock, alias=name, api_key=api_key, max_queue=max_queue)

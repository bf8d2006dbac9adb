"""`rotary serve`: an OpenAI-compatible HTTP server over one engine, with a live view of the expert cache.

Modules: requests (request bodies, validated), responses (answer bodies and stream chunks), errors
(OpenAI-shaped), worker (the engine's one thread and its bounded queue), live (the cache view's pictures),
metrics (Prometheus), app (the Starlette application), static/index.html (the web page).
"""

from __future__ import annotations

import signal
import socket

from rotary_gguf.errors import RotaryError
from rotary_gguf.runtime import Engine


class ServeError(RotaryError):
    """The server cannot start (the address is taken, the name does not resolve)."""


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or ServeError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(engine: Engine, sock: socket.socket, *, alias: str, api_key: str | None = None, max_queue: int = 16,
          max_body: int = 8 * 2**20) -> None:
    """Serve until SIGINT or SIGTERM (both end in KeyboardInterrupt once the server has shut down cleanly:
    streams stopped, the worker joined). The caller closes the engine."""
    import uvicorn

    from rotary_gguf.server.app import Server, ServerConfig

    served = Server(engine, ServerConfig(alias, api_key, max_queue, max_body))
    config = uvicorn.Config(served.app(), log_config=None, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            served.worker.interrupt()  # streams end now (their generation stops), waiting requests get 503
            await super().shutdown(sockets)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)  # uvicorn re-raises the signal it shut down for
    server = Uvicorn(config)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise ServeError("the server did not start (see the log above)")

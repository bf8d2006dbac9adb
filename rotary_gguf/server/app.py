"""The ASGI application (Starlette): the OpenAI endpoints, /health, /metrics, the live view's JSON and the web
page, with an API key check, a body size limit and OpenAI-shaped errors. Streams are server-sent events
written by Starlette's StreamingResponse (which also ends them when the client disconnects)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rotary_gguf.runtime import Engine, Generation
from rotary_gguf.server.errors import APIError, server_error, too_large, unauthorized
from rotary_gguf.server.live import LiveView
from rotary_gguf.server.metrics import CONTENT_TYPE, Metrics
from rotary_gguf.server.requests import GenerationRequest, chat_request, completion_request
from rotary_gguf.server.responses import Reply, sse
from rotary_gguf.server.worker import EngineWorker, Job
from rotary_gguf.template import ChatTemplate, TemplateError

log = logging.getLogger(__name__)

MAX_BODY = 8 * 2**20
DISCONNECT_POLL = 0.25  # seconds between checks that a client waiting for a whole answer is still there
# A stream writes at most once per FLUSH_SECONDS: tokens that come faster (a small model, a fast GPU) share a
# write, so the event loop and the client keep off the cores llama.cpp decodes on. Below 100 tok/s every token
# is written as it comes.
FLUSH_SECONDS = 0.01
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold events back


@dataclass(frozen=True)
class ServerConfig:
    alias: str  # the model's name in /v1/models and in every answer
    api_key: str | None = None
    max_queue: int = 16
    max_body: int = MAX_BODY


class _Guard:
    """ASGI middleware: the API key on /v1/* and /metrics, and 413 for a declared body over the limit
    (a chunked body is counted while it is read)."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            path = scope["path"]
            if self.config.api_key and (path.startswith("/v1/") or path == "/metrics"):
                given = headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
                    await unauthorized().response()(scope, receive, send)
                    return
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.config.max_body:
                await too_large(int(declared), self.config.max_body).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client went away while sending the request") from None
    return b"".join(chunks)


class Server:
    """The engine's worker, the live view and the metrics behind one Starlette app."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.live = LiveView(config.alias)
        self.worker = EngineWorker(engine, self.live, config.max_queue, on_finished=self._finished)
        self.metrics = Metrics(lambda: self.worker.state, self.live)
        self.page = resources.files("rotary_gguf.server").joinpath("static/index.html").read_text("utf-8")
        self.template: ChatTemplate | TemplateError
        try:  # compiled and probed once, before the worker owns the engine
            self.template = engine.chat_template()
        except TemplateError as exc:
            self.template = exc

    def _finished(self, request: GenerationRequest, g: Generation) -> None:
        stats = self.engine.rotary_stats()
        self.metrics.generation(g, (stats.expert_reads_device, stats.expert_reads_host) if stats else None)

    # Lifetime
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.live.capture(self.engine, None)
        self.worker.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

    def app(self) -> ASGIApp:
        routes = [
            Route("/", self.index), Route("/health", self.health), Route("/metrics", self.metrics_text),
            Route("/v1/models", self.models), Route("/v1/models/{model:path}", self.model),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/rotary/stats", self.stats),
        ]
        handlers = {APIError: self._api_error, HTTPException: self._http_error, Exception: self._crash}
        app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self.lifespan)
        return _Guard(app, self.config)

    # Errors
    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        self._count(request, exc.status)
        return exc.response()

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"Not found: {request.method} {request.url.path}",
                   405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                              exc.detail)
        return APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                        headers=dict(exc.headers or {})).response()

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return server_error(f"internal error: {type(exc).__name__}").response()

    def _count(self, request: Request, status: int) -> None:
        if request.url.path in ("/v1/chat/completions", "/v1/completions"):
            self.metrics.requests.labels(request.url.path, str(status)).inc()

    # Plain endpoints
    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def health(self, request: Request) -> Response:
        state = self.worker.state
        return JSONResponse({"status": "ok", "model": self.config.alias, "queue": state.waiting,
                             "running": state.running})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.alias, "object": "model", "created": int(self.engine.path.stat().st_mtime),
                "owned_by": "rotary-gguf"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.config.alias:
            raise APIError(404, f"The model '{name}' does not exist; this server runs '{self.config.alias}'",
                           param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def stats(self, request: Request) -> Response:
        state = self.worker.state
        return JSONResponse({**self.live.picture(), "queue": state.waiting, "completed": state.completed})

    # Generation
    async def chat(self, request: Request) -> Response:
        r = chat_request(await _body(request, self.config.max_body))
        return await self._generate(request, replace(r, prompt=self._render(r)))

    def _render(self, r: GenerationRequest) -> str:
        """The chat through the GGUF's template, here on the event loop (the main thread), where a template
        that does not finish rendering in 2 s is stopped (templates are untrusted); the worker only tokenizes."""
        if isinstance(self.template, TemplateError):
            raise APIError(400, str(self.template), param="messages", code="template_error")
        try:
            return self.template.render([dict(m) for m in r.messages or ()])
        except TemplateError as exc:
            raise APIError(400, str(exc), param="messages", code="template_error") from None

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, completion_request(await _body(request, self.config.max_body)))

    async def _generate(self, request: Request, r: GenerationRequest) -> Response:
        started = time.monotonic()
        job = self.worker.submit(r, asyncio.get_running_loop())
        checked = [asyncio.get_running_loop().time()]
        first = await self._wait(request, job, checked)
        if first is None:
            return Response(status_code=499)  # the client went away while waiting; it hears nothing
        if first.kind == "error":
            assert first.error is not None
            raise first.error
        reply = Reply(r.endpoint, self.config.alias, r.include_usage)
        if r.stream:
            return StreamingResponse(self._events(job, reply, started), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await self._whole(request, job, reply, started, checked)

    async def _wait(self, request: Request, job: Job, checked: list[float]) -> Any:
        """The job's next event; None (the job cancelled) if the client disconnects meanwhile (asked every
        DISCONNECT_POLL seconds; checked[0] is when it was last asked)."""
        loop = asyncio.get_running_loop()
        while True:
            event = await job.next_event(DISCONNECT_POLL)
            if event is not None and loop.time() - checked[0] < DISCONNECT_POLL:
                return event
            checked[0] = loop.time()
            if await request.is_disconnected():
                self.worker.cancel(job)
                job.discard()
                return None
            if event is not None:
                return event

    async def _whole(self, request: Request, job: Job, reply: Reply, started: float,
                     checked: list[float]) -> Response:
        pieces = []
        while True:
            event = await self._wait(request, job, checked)
            if event is None:
                return Response(status_code=499)
            if event.kind == "text":
                pieces.append(event.text)
            elif event.kind == "error":
                assert event.error is not None
                raise event.error
            else:
                assert event.generation is not None
                self._count(request, 200)
                self.metrics.duration.labels(request.url.path).observe(time.monotonic() - started)
                return JSONResponse(reply.whole("".join(pieces), event.generation))

    async def _events(self, job: Job, reply: Reply, started: float) -> AsyncIterator[bytes]:
        """SSE events of a streamed answer, as bytes: at most one write per FLUSH_SECONDS, with every event
        that came meanwhile (the worker does not wake the event loop while it sleeps here). A client that goes
        away cancels this generator, and the job with it."""
        endpoint = "/v1/chat/completions" if reply.chat else "/v1/completions"
        loop, written = asyncio.get_running_loop(), 0.0
        try:
            opening = reply.opening()
            if opening is not None:
                yield sse(opening)
            while True:
                if (wait := written + FLUSH_SECONDS - loop.time()) > 0:
                    await asyncio.sleep(wait)
                first = await job.next_event()
                assert first is not None
                out = []
                for event in (first, *job.ready()):
                    if event.kind == "text":
                        out.append(reply.piece_event(event.text))
                    elif event.kind == "error":
                        assert event.error is not None
                        self.metrics.requests.labels(endpoint, str(event.error.status)).inc()
                        yield b"".join(out) + sse(event.error.body())
                        return
                    else:
                        g = event.generation
                        assert g is not None
                        out.append(sse(reply.closing(g)))
                        if reply.include_usage:
                            out.append(sse(reply.usage_chunk(g)))
                        yield b"".join(out) + sse("[DONE]")
                        self.metrics.requests.labels(endpoint, "200").inc()
                        self.metrics.duration.labels(endpoint).observe(time.monotonic() - started)
                        return
                yield b"".join(out)
                written = loop.time()
        finally:
            self.worker.cancel(job)
            job.discard()

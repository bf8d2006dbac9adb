"""The engine's one thread: requests run one at a time, in arrival order, behind a bounded queue.

The engine is single-threaded, so this thread is the only one that touches it: it renders and tokenizes
prompts, generates, and takes the live view's pictures between tokens. Each request is a Job whose events
(start, text pieces, done or error) reach the event loop through loop.call_soon_threadsafe. A job
cancelled while it waits is skipped; one cancelled while it runs stops after the token being decoded
(Stream.stop), and the next job starts at once."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rotary_gguf.errors import RotaryError
from rotary_gguf.runtime import ContextError, Engine, Generation, Sampling, Stream
from rotary_gguf.server.errors import APIError, busy, invalid, server_error
from rotary_gguf.server.live import LiveView
from rotary_gguf.server.requests import GenerationRequest
from rotary_gguf.template import TemplateError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    kind: str  # "start" (the prompt is accepted), "text", "done", "error"
    text: str = ""
    generation: Generation | None = None
    error: APIError | None = None


class Job:
    """One request on its way through the worker; events are read on the event loop with next_event()."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request, self._loop = request, loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._getter: asyncio.Future[Event] | None = None
        self._sent: collections.deque[Event] = collections.deque()  # emitted, not yet on the loop's queue
        self._woken = False  # a wake-up is on its way to the loop
        self.state = "queued"  # queued, running, cancelled, done
        self.stream: Stream | None = None
        self.submitted = time.monotonic()

    def emit(self, event: Event) -> None:
        """From the worker thread: one wake-up of the event loop carries every event sent until it runs."""
        self._sent.append(event)
        if self._woken:
            return
        self._woken = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _deliver(self) -> None:
        self._woken = False  # before taking: an event sent from now on sends its own wake-up
        while self._sent:
            self._events.put_nowait(self._sent.popleft())

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds (the pending read is kept for the next call)."""
        if timeout is None and self._getter is None:
            return await self._events.get()
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._events.get())
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        event, self._getter = self._getter.result(), None
        return event

    def ready(self) -> list[Event]:
        """The events already here, without waiting (a stream sends them in one write when it fell behind)."""
        out = []
        while self._getter is None and not self._events.empty():
            out.append(self._events.get_nowait())
        return out

    def attach(self, stream: Stream) -> None:
        """From the worker thread, as the job starts: a cancel from now on stops this stream."""
        self.stream = stream
        if self.state == "cancelled":
            stream.stop()

    def discard(self) -> None:
        if self._getter is not None:
            self._getter.cancel()


@dataclass
class WorkerState:
    waiting: int = 0
    running: bool = False
    completed: int = 0
    mean_seconds: float = 1.0  # exponential mean of a request's time on the engine (for Retry-After)


class EngineWorker:
    """The thread that owns the engine and the queue in front of it."""

    def __init__(self, engine: Engine, live: LiveView, max_queue: int = 16,
                 on_finished: Callable[[GenerationRequest, Generation], None] | None = None) -> None:
        self.engine, self.live, self.max_queue = engine, live, max_queue
        self.state = WorkerState()
        self._on_finished = on_finished
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._current: Job | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="rotary-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job after its current token, refuse what waits, and end the thread."""
        with self._lock:
            self._closing = True
            current = self._current
        if current is not None:
            self.cancel(current)
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a request, or raise 429 when max_queue requests already wait (Retry-After: an estimate)."""
        job = Job(request, loop)
        with self._lock:
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error")
            if self.state.waiting >= self.max_queue:
                wait = math.ceil(self.state.mean_seconds * (self.state.waiting + 1))
                raise busy(self.state.waiting, self.max_queue, min(max(wait, 1), 60))
            self.state.waiting += 1
            self._queue.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: a waiting job is dropped, a running one stops within one token."""
        with self._lock:
            if job.state == "queued":
                self.state.waiting -= 1
            if job.state in ("queued", "running"):
                job.state = "cancelled"
            stream = job.stream
        if stream is not None:
            stream.stop()

    def _take(self) -> Job | None:
        while True:
            job = self._queue.get()
            if job is None:
                return None
            with self._lock:
                if job.state == "cancelled":
                    continue
                if self._closing:
                    self.state.waiting -= 1
                    job.state = "done"
                    job.emit(Event("error", error=APIError(503, "the server is shutting down", type="server_error")))
                    continue
                self.state.waiting -= 1
                job.state, self._current, self.state.running = "running", job, True
                return job

    def _run(self) -> None:
        while (job := self._take()) is not None:
            started = time.monotonic()
            try:
                last = self._execute(job)
            except APIError as exc:
                last = Event("error", error=exc)
            except Exception as exc:  # a failure inside llama.cpp must not take the server down
                log.exception("request failed")
                last = Event("error", error=server_error(f"generation failed: {type(exc).__name__}: {exc}"))
            self.live.capture(self.engine, None)
            with self._lock:  # all said before the client hears the end: it may ask for /health or stats next
                job.state = "done" if job.state == "running" else job.state
                self._current, self.state.running = None, False
                self.state.completed += 1
                elapsed = time.monotonic() - started
                self.state.mean_seconds = 0.7 * self.state.mean_seconds + 0.3 * elapsed
            job.emit(last)

    def _prompt(self, r: GenerationRequest) -> list[int]:
        engine = self.engine
        if r.messages is not None:
            try:
                text = engine.render_chat([dict(m) for m in r.messages])
            except TemplateError as exc:
                raise invalid(str(exc), "messages", "template_error") from None
            ids = engine.tokenize(text)
        else:
            ids = engine.tokenize(r.prompt) if isinstance(r.prompt, str) else list(r.prompt or ())
            n_vocab = engine.index.params.n_vocab
            bad = None if isinstance(r.prompt, str) else next((t for t in ids if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise invalid(f"token id {bad} is not in the model's vocabulary (0..{n_vocab - 1})", "prompt")
        n_ctx = engine.context_size
        if len(ids) >= n_ctx:
            where = "messages" if r.messages is not None else "prompt"
            raise invalid(f"This model's maximum context length is {n_ctx} tokens, and the prompt has {len(ids)}: "
                          f"at most {n_ctx - 1} prompt tokens fit (one is needed for the reply). Send a shorter "
                          "prompt, or start rotary serve with a larger --ctx.", where, "context_length_exceeded")
        return ids

    def _execute(self, job: Job) -> Event:
        r = job.request
        ids = self._prompt(r)
        sampling = Sampling(temp=r.temp, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p, seed=r.seed,
                            grammar=r.grammar)
        max_tokens = r.max_tokens or self.engine.context_size - len(ids)
        try:
            stream = self.engine.generate(ids, max_tokens, sampling=sampling, keep_state=True, stop=r.stop,
                                          ignore_eos=r.ignore_eos, interruptible=False)
        except ContextError as exc:
            raise invalid(str(exc), "prompt") from None
        except RotaryError as exc:  # a grammar llama.cpp refuses
            raise invalid(str(exc), "response_format") from None
        job.attach(stream)
        job.emit(Event("start"))
        self.live.capture(self.engine, {"generated": 0, "decode_tokens_per_second": None})
        first = None
        try:
            for piece in stream:
                job.emit(Event("text", piece))
                first = first or time.perf_counter()
                if self.live.due():
                    self.live.capture(self.engine, _progress(stream, first, time.perf_counter()))
        finally:
            stream.close()
        generation = stream.result
        if self._on_finished is not None:
            self._on_finished(r, generation)
        return Event("done", generation=generation)


def _progress(stream: Stream, first: float, now: float) -> dict[str, Any]:
    """The running request, for the live view: tokens so far and the decode rate since the first piece."""
    n = len(stream.tokens)
    return {"generated": n, "decode_tokens_per_second": round((n - 1) / (now - first), 1) if n > 1 and now > first
            else None}

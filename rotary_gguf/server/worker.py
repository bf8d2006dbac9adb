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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    kind: str  # "start" (the prompt is accepted), "text", "done", "error"
    text: str = ""
    generation: Generation | None = None
    error: APIError | None = None


class Job:
    """One request on its way through the worker; events are read on the event loop with next_event().

    The worker appends events to a deque and wakes the event loop only when a reader waits for one: a stream
    that is between writes (or a whole answer, which waits for the end) costs the event loop nothing per
    token."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request, self._loop = request, loop
        self._sent: collections.deque[Event] = collections.deque()  # emitted, not yet read
        self._waiter: asyncio.Future[None] | None = None  # a reader waiting on the event loop
        self._wake_on_text = request.stream  # a whole answer is read at its end (and at disconnect checks)
        self.state = "queued"  # queued, running, cancelled, done
        self.stream: Stream | None = None
        self.submitted = time.monotonic()

    def emit(self, event: Event) -> None:
        """From the worker thread."""
        self._sent.append(event)
        waiter = self._waiter  # read after the append: a reader that checked the deque before it is seen here
        if waiter is None or (event.kind == "text" and not self._wake_on_text):
            return
        try:  # only the reader clears _waiter (were this thread to, it could clear the reader's next one)
            self._loop.call_soon_threadsafe(_wake, waiter)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds."""
        while not self._sent:
            waiter = self._waiter = self._loop.create_future()
            if not self._sent:  # else it came between the check and the waiter
                done, _ = await asyncio.wait({waiter}, timeout=timeout)
                if not done and not self._sent:
                    self._waiter = None
                    return None
            self._waiter = None
        return self._sent.popleft()

    def ready(self) -> list[Event]:
        """The events already here, without waiting (a stream sends them in one write)."""
        out = []
        while self._sent:
            out.append(self._sent.popleft())
        return out

    def attach(self, stream: Stream) -> None:
        """From the worker thread, as the job starts: a cancel from now on stops this stream."""
        self.stream = stream
        if self.state == "cancelled":
            stream.stop()

    def discard(self) -> None:
        self._waiter = None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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

    def interrupt(self) -> None:
        """The server is shutting down: the running job stops after its current token, waiting ones get 503,
        new ones are refused."""
        with self._lock:
            self._closing = True
            current = self._current
        if current is not None:
            self.cancel(current)

    def stop(self, timeout: float = 30.0) -> None:
        """interrupt(), then end the thread."""
        self.interrupt()
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
        """The prompt's tokens (a chat arrives rendered: the event loop renders templates, under a time limit)."""
        engine = self.engine
        if isinstance(r.prompt, str):
            ids = engine.tokenize(r.prompt)
        else:
            ids = list(r.prompt or ())
            n_vocab = engine.index.params.n_vocab
            bad = next((t for t in ids if not 0 <= t < n_vocab), None)
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

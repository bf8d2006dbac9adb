"""GET /metrics in Prometheus' text format (prometheus-client, one registry per server): requests, tokens in and
out, prompt and decode speed, the queue, expert reads from VRAM and host, host RSS and VRAM."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rotary_gguf.runtime import Generation
from rotary_gguf.server.live import LiveView
from rotary_gguf.server.worker import WorkerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Now(Collector):
    """Gauges read at scrape time: the queue, the expert cache's last hit rate, memory."""

    def __init__(self, state: Callable[[], WorkerState], live: LiveView) -> None:
        self._state, self._live = state, live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state, picture = self._state(), self._live.picture()
        yield GaugeMetricFamily("rotary_queue_depth", "Requests waiting for the engine", value=state.waiting)
        yield GaugeMetricFamily("rotary_requests_running", "Requests on the engine now (0 or 1)",
                                value=int(state.running))
        rotary = picture.get("rotary")
        if rotary and rotary["hit_rate"] is not None:
            yield GaugeMetricFamily("rotary_expert_hit_rate",
                                    "Share of the last request's decoded expert reads served from VRAM slots",
                                    value=rotary["hit_rate"])
        memory = picture["memory"]
        yield GaugeMetricFamily("rotary_host_rss_bytes", "Resident memory of the server process",
                                value=memory["rss_bytes"])
        if memory["vram_used_bytes"] is not None:
            yield GaugeMetricFamily("rotary_vram_used_bytes", "VRAM used (this process where the driver says)",
                                    value=memory["vram_used_bytes"])
            yield GaugeMetricFamily("rotary_vram_total_bytes", "VRAM of GPU 0", value=memory["vram_total_bytes"])


class Metrics:
    def __init__(self, state: Callable[[], WorkerState], live: LiveView) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("rotary_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("rotary_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.cached_tokens = Counter("rotary_prompt_tokens_cached",
                                     "Prompt tokens whose KV cache was reused from the previous request", registry=r)
        self.completion_tokens = Counter("rotary_completion_tokens", "Tokens generated", registry=r)
        self.prompt_speed = Gauge("rotary_prompt_tokens_per_second", "Prompt evaluation speed of the last request",
                                  registry=r)
        self.decode_speed = Gauge("rotary_decode_tokens_per_second", "Decode speed of the last request", registry=r)
        self.expert_reads = Counter("rotary_expert_reads", "Decoded (token, expert) selections by where the expert "
                                    "was read from", ["source"], registry=r)
        self.duration = Histogram("rotary_request_duration_seconds", "Time from arrival to the last byte",
                                  ["endpoint"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                  registry=r)
        r.register(_Now(state, live))

    def generation(self, g: Generation, reads: tuple[int, int] | None) -> None:
        """A finished generation (from the worker thread; prometheus-client's metrics are thread-safe)."""
        self.prompt_tokens.inc(g.prompt_tokens)
        self.cached_tokens.inc(g.cached_tokens)
        self.completion_tokens.inc(len(g.tokens))
        if g.prompt_tokens > g.cached_tokens:
            self.prompt_speed.set(g.prompt_tokens_per_second)
        if len(g.tokens) > 1:
            self.decode_speed.set(g.decode_tokens_per_second)
        if reads is not None:
            self.expert_reads.labels("vram").inc(reads[0])
            self.expert_reads.labels("host").inc(reads[1])

    def render(self) -> bytes:
        return generate_latest(self.registry)

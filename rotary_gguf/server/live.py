"""The live view of the engine behind GET /v1/rotary/stats and /metrics: per layer, which experts sit in the
VRAM slots, how often each was selected and the hit rate, plus the running request's progress.

Pictures are taken by the worker thread (the only one that touches the engine), between tokens at most every
`interval` seconds and after every request; readers on the event loop get the latest one, whole. Host and
GPU memory are sampled by the reader, at most once a second (they need no engine)."""

from __future__ import annotations

import threading
import time
from typing import Any

from rotary_gguf.runtime import Engine
from rotary_gguf.telemetry import sample_telemetry


def _rotary(engine: Engine) -> dict[str, Any] | None:
    rotation = engine.rotation
    stats = engine.rotary_stats()
    if rotation is None or stats is None:
        return None
    layers = []
    for s in rotation.layer_stats():
        shape = rotation.layers[s.layer]
        slots = rotation.rotator.expert_in.get(s.layer)
        reads = s.device_pairs + s.host_pairs
        layers.append({"layer": s.layer, "experts": shape.n_expert, "slots": shape.n_slots,
                       "resident": [int(e) for e in slots if e >= 0] if slots is not None else [],
                       "hits": s.device_pairs, "misses": s.host_pairs,
                       "hit_rate": round(s.device_pairs / reads, 4) if reads else None,
                       "selections": list(s.counts)})
    return {"device": stats.device, "policy": stats.policy, "copy_budget": stats.copy_budget,
            "hit_rate": stats.hit_rate if stats.expert_reads_device + stats.expert_reads_host else None,
            "expert_reads_device": stats.expert_reads_device, "expert_reads_host": stats.expert_reads_host,
            "admissions": stats.admissions, "evictions": stats.evictions, "bytes_copied": stats.bytes_copied,
            "layers": layers}


def _last(engine: Engine) -> dict[str, Any] | None:
    g = engine.last
    if g is None:
        return None
    return {"prompt_tokens": g.prompt_tokens, "cached_tokens": g.cached_tokens, "generated": len(g.tokens),
            "prompt_tokens_per_second": round(g.prompt_tokens_per_second, 1),
            "decode_tokens_per_second": round(g.decode_tokens_per_second, 1), "finish_reason": g.finish_reason}


class LiveView:
    """The latest picture of the engine (a dict replaced whole, so readers on other threads see one picture)."""

    def __init__(self, model: str, interval: float = 0.25) -> None:
        self.model, self.interval = model, interval
        self._picture: dict[str, Any] = {"model": model, "state": "starting", "seq": 0}
        self._taken = 0.0
        self._memory: tuple[float, dict[str, Any]] = (0.0, {})
        self._memory_lock = threading.Lock()

    def due(self) -> bool:
        """Whether the last picture is `interval` old (the worker asks after each token)."""
        return time.monotonic() - self._taken >= self.interval

    def capture(self, engine: Engine, progress: dict[str, Any] | None) -> None:
        """From the worker: progress is the running request's, None when the engine is idle."""
        self._taken = time.monotonic()
        self._picture = {
            "model": self.model, "file": engine.path.name, "placement": engine.placement.strategy,
            "gpu": engine.gpu, "context": engine.context_size,
            "state": "generating" if progress is not None else "idle", "seq": self._picture["seq"] + 1,
            "time": time.time(), "request": progress, "last": _last(engine), "rotary": _rotary(engine),
        }

    def memory(self) -> dict[str, Any]:
        """Host RSS and VRAM now (sampled at most once a second)."""
        with self._memory_lock:
            when, memory = self._memory
            if time.monotonic() - when >= 1.0:
                t = sample_telemetry()
                memory = {"rss_bytes": t.rss_bytes, "vram_used_bytes": t.vram_used_bytes,
                          "vram_total_bytes": t.vram_total_bytes}
                self._memory = (time.monotonic(), memory)
        return memory

    def picture(self) -> dict[str, Any]:
        return {**self._picture, "memory": self.memory()}

"""`rotary bench`: prompt and decode speed, peak VRAM and host RSS of each placement, measured like
llama-bench: a warm-up, then repetitions interleaved across placements (so a slow spell of a noisy machine
hits every placement alike), mean and standard deviation, and each placement's memory released before the
next one loads (checked with RSS; a child process per run when the model is over half the RAM)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from rotary_gguf.plan import Placement
from rotary_gguf.profile import Profile, load_profile
from rotary_gguf.runtime import Buffer, ContextError, Engine, EngineOptions, ModelSetup, gpu_device_name, prepare
from rotary_gguf.telemetry import PeakSampler

# Prose, code and chat, repeated to the asked prompt length.
_PROMPT_TEXT = (
    "<|im_start|>user\nThe licensee may copy and distribute verbatim copies of the program's source code "
    "as received, in any medium.\ndef main(argv):\n    for name in sorted(argv):\n        print(name)\n"
    "<|im_end|>\n<|im_start|>assistant\n"
)
WARMUP_PROMPT, WARMUP_TOKENS = 16, 4


@dataclass(frozen=True)
class BenchSpec:
    strategies: tuple[str, ...]
    prompt_tokens: int = 512
    decode_tokens: int = 128
    repetitions: int = 3
    isolate: bool | None = None  # None: a child process per run when the model is over half the RAM


@dataclass(frozen=True)
class Run:
    """One repetition of one placement."""

    prompt_tok_s: float
    decode_tok_s: float
    peak_vram_bytes: int | None
    peak_rss_bytes: int
    rss_before_bytes: int  # before the load
    rss_after_bytes: int  # after the model was closed
    load_seconds: float
    prompt_tokens: int
    decode_tokens: int
    buffers: tuple[Buffer, ...]
    rotary: dict[str, Any] | None = None


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 2),
            "sd": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}


@dataclass(frozen=True)
class PlacementResult:
    name: str
    placement: Placement
    runs: tuple[Run, ...]

    @property
    def prompt_tok_s(self) -> dict[str, float]:
        return _mean_sd([r.prompt_tok_s for r in self.runs])

    @property
    def decode_tok_s(self) -> dict[str, float]:
        return _mean_sd([r.decode_tok_s for r in self.runs])

    @property
    def peak_rss_bytes(self) -> int:
        return max(r.peak_rss_bytes for r in self.runs)

    @property
    def peak_vram_bytes(self) -> int | None:
        values = [r.peak_vram_bytes for r in self.runs if r.peak_vram_bytes is not None]
        return max(values) if values else None

    @property
    def rss_delta_bytes(self) -> int:
        """Peak RSS above the RSS before the load, the largest over the runs."""
        return max(r.peak_rss_bytes - r.rss_before_bytes for r in self.runs)

    @property
    def rss_retained_bytes(self) -> int:
        """RSS still held after the model was closed, the largest over the runs (0 in a child process)."""
        return max(max(0, r.rss_after_bytes - r.rss_before_bytes) for r in self.runs)

    @property
    def rotary(self) -> dict[str, Any] | None:
        return self.runs[-1].rotary

    def to_json(self) -> dict[str, Any]:
        rotary = self.rotary
        extra = {}
        if rotary:
            rates = [r.rotary["hit_rate"] for r in self.runs if r.rotary]
            extra = {"rotary": rotary, "hit_rate": _mean_sd(rates)["mean"],
                     "expert_reads_device": rotary["expert_reads_device"],
                     "expert_reads_host": rotary["expert_reads_host"],
                     "policy": rotary["policy"], "copy_budget": rotary["copy_budget"]}
        last = self.runs[-1]
        return {**extra,
                "name": self.name, "repetitions": len(self.runs), "prompt_tokens": last.prompt_tokens,
                "decode_tokens": last.decode_tokens, "prompt_tok_s": self.prompt_tok_s,
                "decode_tok_s": self.decode_tok_s,
                "runs": [{"prompt_tok_s": round(r.prompt_tok_s, 2), "decode_tok_s": round(r.decode_tok_s, 2),
                          "peak_rss_bytes": r.peak_rss_bytes, "rss_before_bytes": r.rss_before_bytes,
                          "rss_after_bytes": r.rss_after_bytes, "load_seconds": round(r.load_seconds, 2)}
                         for r in self.runs],
                "peak_vram_bytes": self.peak_vram_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "rss_delta_bytes": self.rss_delta_bytes, "rss_retained_bytes": self.rss_retained_bytes,
                "predicted_vram_bytes": self.placement.predicted_vram_bytes,
                "predicted_host_bytes": self.placement.predicted_host_bytes,
                "gpu_expert_layers": list(self.placement.gpu_expert_layers),
                "buffers": [{"kind": b.kind, "name": b.name, "bytes": b.nbytes} for b in last.buffers]}


@dataclass(frozen=True)
class BenchResult:
    model: Path
    profile: Profile
    vram_budget_bytes: int
    gpu: str | None
    spec: BenchSpec
    isolated: bool
    placements: tuple[PlacementResult, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # placement -> why it was not run

    def to_json(self) -> dict[str, Any]:
        return {"model": str(self.model), "profile": self.profile.name, "vram_budget_bytes": self.vram_budget_bytes,
                "gpu": self.gpu, "repetitions": self.spec.repetitions, "isolated": self.isolated,
                "placements": [p.to_json() for p in self.placements], "skipped": self.skipped}


def prompt_ids(engine: Engine, n_tokens: int) -> list[int]:
    """Exactly n_tokens of text tokens."""
    ids = engine.tokenize(_PROMPT_TEXT)
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def measure(setup: ModelSetup, prompt_tokens: int, decode_tokens: int) -> Run:
    """Load with one placement, warm up, evaluate a prompt and decode greedily, sampling peak RSS and VRAM;
    the RSS after the model is closed tells whether its memory was released."""
    process = psutil.Process()
    before = process.memory_info().rss
    with PeakSampler() as peak, Engine.from_setup(setup) as engine:
        engine.complete(prompt_ids(engine, WARMUP_PROMPT), WARMUP_TOKENS, ignore_eos=True)
        g = engine.complete(prompt_ids(engine, prompt_tokens), decode_tokens, ignore_eos=True)
        rotary = engine.rotary_stats()
        load_seconds, buffers = engine.load_seconds, engine.buffers
        replay = engine.rotation.replay if engine.rotation else None
    stats = rotary.to_json() if rotary else None
    if stats is not None:
        kind = "synthetic" if replay and replay.header.synthetic else "recorded"
        stats["routing"] = (f"replayed from {setup.options.replay.name} ({kind} trace; outputs are not the "
                            "model's)" if replay else "the model's own")
    return Run(g.prompt_tokens_per_second, g.decode_tokens_per_second, peak.peak_vram, peak.peak_rss, before,
               process.memory_info().rss, load_seconds, g.prompt_tokens, len(g.tokens), buffers, stats)


def _measure_in_child(setup: ModelSetup, prompt_tokens: int, decode_tokens: int) -> Run:
    """measure() in a fresh process (spawned: no llama.cpp state inherited), which returns all its memory."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, setup, prompt_tokens, decode_tokens).result()


def measure_interleaved(setups: list[tuple[str, ModelSetup]], spec: BenchSpec,
                        progress: Callable[[int, int, str], None] | None = None) -> tuple[tuple[PlacementResult, ...],
                                                                                         bool]:
    """Measure labelled setups spec.repetitions times each, interleaved (each repetition starts one setup
    later, so none always runs first or after the same other); returns the results and whether each run had
    a child process of its own (spec.isolate, or by default when the model is over half the RAM)."""
    isolate = spec.isolate
    if isolate is None:
        isolate = setups[0][1].index.file_size > psutil.virtual_memory().total / 2
    run = _measure_in_child if isolate else measure
    runs: dict[int, list[Run]] = {i: [] for i in range(len(setups))}
    total = spec.repetitions * len(setups)
    for rep in range(spec.repetitions):
        for k in range(len(setups)):
            i = (k + rep) % len(setups)
            label, setup = setups[i]
            if progress:
                progress(rep * len(setups) + k, total, f"{label} #{rep + 1}")
            if rep:  # a trace records the first repetition only
                setup = replace(setup, options=replace(setup.options, trace=None))
            runs[i].append(run(setup, spec.prompt_tokens, spec.decode_tokens))
    if progress:
        progress(total, total, "done")
    return tuple(PlacementResult(label, s.placement, tuple(runs[i])) for i, (label, s) in enumerate(setups)), isolate


def run_bench(model: Path, profile: Profile | str, options: EngineOptions, spec: BenchSpec, *,
              skipped: dict[str, str] | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> BenchResult:
    """Benchmark each of spec.strategies on the same model and profile (see measure_interleaved)."""
    needed = spec.prompt_tokens + spec.decode_tokens
    if options.ctx is not None and needed > options.ctx:
        raise ContextError(f"{spec.prompt_tokens} prompt + {spec.decode_tokens} decoded tokens do not fit ctx "
                           f"{options.ctx}")
    profile = load_profile(profile) if isinstance(profile, str) else profile
    options = replace(options, ctx=options.ctx or max(profile.ctx, needed))
    setups = [(s, prepare(model, profile, s, options)) for s in spec.strategies]
    results, isolated = measure_interleaved(setups, spec, progress)
    first = setups[0][1]
    return BenchResult(Path(model), first.profile, first.placement.vram_budget_bytes, gpu_device_name(), spec,
                       isolated, results, dict(skipped or {}))

"""The engine: one object that owns a model opened for use - its index, calibration, plan, llama.cpp
context, scheduler plugin state and rotation - and everything the commands do with it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rotary_gguf import cost
from rotary_gguf.calibration import Calibration, load_calibration
from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex, open_index
from rotary_gguf.plan import Placement, plan_placement
from rotary_gguf.profile import Profile, load_profile
from rotary_gguf.rotation import Rotation
from rotary_gguf.runtime import rpc, scheduler
from rotary_gguf.runtime.generation import (
    Generation,
    PromptCache,
    Sampling,
    Stream,
    context_size,
    evaluate,
    evaluate_logits,
)
from rotary_gguf.runtime.llama import Buffer, gpu_device_name, llama_cpp
from rotary_gguf.runtime.loader import LoadedLlama, dry_run, load_llama
from rotary_gguf.runtime.options import EngineOptions
from rotary_gguf.runtime.stats import EngineStats, RotaryStats, rotary_stats
from rotary_gguf.telemetry import sample_telemetry
from rotary_gguf.template import ChatTemplate, Message, template_from_metadata
from rotary_gguf.trace import TraceHeader, TraceWriter, read_trace

PLACEMENTS = ("auto", "layer-fill", "experts-on-host", "rotary")


def resolve_strategy(requested: str, options: EngineOptions, index: ModelIndex | None = None,
                     profile: Profile | None = None,
                     popularity: dict[int, np.ndarray] | None = None) -> tuple[str, tuple[str, ...]]:
    """The placement strategy that will run, and notes for the user: auto is the fastest placement the cost
    model predicts for this model and a GPU profile (rotary only where the scheduler plugin can run here),
    said in one line; otherwise rotary where it can run, else layer-fill. A rotary that cannot run falls
    back to layer-fill, said once. `popularity` is the model's calibration, if any (the predicted hit rate)."""
    if requested not in PLACEMENTS:
        raise ValueError(f"unknown placement {requested!r}")
    if options.routing_only:
        return "rotary", ()
    if requested not in ("auto", "rotary"):
        return requested, ()
    reason = scheduler.rotary_unavailable()
    if requested == "auto" and index is not None and profile is not None and index.is_moe and profile.has_gpu:
        predicted = cost.candidates(index, profile, vram_budget=options.vram_budget, ctx=options.ctx,
                                    layer_order=options.layer_order, popularity=popularity)
        strategy, why = cost.choose(predicted, rotary_runs=reason is None)
        return strategy, (why,)
    if reason is None:
        return "rotary", ()
    return "layer-fill", ((f"{reason}; using layer-fill",) if requested == "rotary" else ())


@dataclass(frozen=True)
class ModelSetup:
    """What Engine.open decides before llama.cpp sees the model (also what `rotary plan` shows)."""

    index: ModelIndex
    profile: Profile  # with the options' overrides applied
    options: EngineOptions  # unset fields filled from the profile
    placement: Placement
    calibration: Calibration | None
    notes: tuple[str, ...]


def prepare(model: str | Path, profile: Profile | str = "auto", placement: str = "auto",
            options: EngineOptions | None = None, *, runnable: bool = True) -> ModelSetup:
    """Index, calibration and plan of a model, each once; no llama.cpp load. runnable=False plans the
    strategy as asked even where it cannot run here (`rotary plan` for another machine)."""
    options = options or EngineOptions()
    index = open_index(Path(model))
    base = load_profile(profile) if isinstance(profile, str) else profile
    effective, filled = options.for_profile(base)
    calibration, source = load_calibration(index)
    popularity = calibration.popularity() if calibration else None
    strategy, notes = (resolve_strategy(placement, options, index, effective, popularity) if runnable
                       else (placement, ()))
    if options.rpc and strategy == "rotary" and placement == "auto":
        strategy, notes = "layer-fill", notes + ("auto: layer-fill (rotary does not place experts on RPC servers)",)
    if calibration is None and "stale" in source:
        notes += (source,)
    if not index.is_moe:
        notes += (f"{index.path.name} is a dense model (no routed experts): whole layers go to the GPU",)
    plan = plan_placement(index, effective, strategy=strategy, vram_budget=options.vram_budget, ctx=options.ctx,
                          layer_order=options.layer_order, popularity=popularity if strategy == "rotary" else None)
    if options.routing_only:
        plan = replace(plan, expert_slots=tuple((layer, 0) for layer in index.moe_layers), slot_bytes=0)
    if options.rpc:
        plan, placed = rpc.place_across(index, plan, options, effective)
        notes += placed
    if runnable and gpu_device_name() is None and plan.vram_budget_bytes and strategy != "rotary":
        notes += ("this llama.cpp build has no GPU backend: everything runs on the CPU "
                  "(`rotary plan` shows where tensors would go)",)
    return ModelSetup(index, effective, filled, plan, calibration, notes)


class Engine:
    """A model opened for use. Open with Engine.open(); close with close() or a with-block."""

    def __init__(self, setup: ModelSetup, loaded: LoadedLlama, rotation: Rotation | None,
                 trace: TraceWriter | None) -> None:
        self.setup, self._loaded, self._llm, self.rotation = setup, loaded, loaded.llm, rotation
        self._trace = trace
        self._template: ChatTemplate | None = None
        self._cache = PromptCache(self._llm)
        self.last: Generation | None = None
        self.gpu = gpu_device_name()

    @classmethod
    def open(cls, model: str | Path, profile: Profile | str = "auto", placement: str = "auto",
             options: EngineOptions | None = None) -> Engine:
        """Open MODEL under PROFILE with a placement strategy (auto, layer-fill, experts-on-host, rotary)."""
        setup = prepare(model, profile, placement, options)
        return cls.from_setup(setup)

    @classmethod
    def from_setup(cls, setup: ModelSetup) -> Engine:
        options, index = setup.options, setup.index
        trace = rotation = None
        with contextlib.ExitStack() as undo:
            if setup.placement.strategy == "rotary" and index.is_moe:
                if options.trace:
                    trace = TraceWriter(options.trace, TraceHeader.for_model(index, options.trace_description))
                    undo.callback(trace.discard)
                popularity = setup.calibration.popularity() if setup.calibration else None
                rotation = scheduler.open_scheduler(index, setup.placement, setup.profile, options,
                                                    popularity=popularity, trace=trace,
                                                    replay=read_trace(options.replay) if options.replay else None)
                undo.callback(scheduler.close_scheduler, rotation)
            loaded = load_llama(index.path, setup.placement, options, scheduler.routing_callback(rotation))
            undo.pop_all()
        return cls(setup, loaded, rotation, trace)

    # What was opened
    @property
    def index(self) -> ModelIndex:
        return self.setup.index

    @property
    def path(self) -> Path:
        return self.setup.index.path

    @property
    def placement(self) -> Placement:
        return self.setup.placement

    @property
    def profile(self) -> Profile:
        return self.setup.profile

    @property
    def options(self) -> EngineOptions:
        return self.setup.options

    @property
    def notes(self) -> tuple[str, ...]:
        return self.setup.notes

    @property
    def buffers(self) -> tuple[Buffer, ...]:
        return self._loaded.buffers

    @property
    def load_seconds(self) -> float:
        return self._loaded.load_seconds

    @property
    def rss_before_load(self) -> int:
        return self._loaded.rss_before_load

    @property
    def log_lines(self) -> tuple[str, ...]:
        return self._loaded.log_lines

    @property
    def context_size(self) -> int:
        return context_size(self._llm)

    def buffer_bytes(self, *, host: bool | None = None, kind: str | None = None) -> int:
        return sum(b.nbytes for b in self.buffers
                   if (host is None or b.on_host == host) and (kind is None or b.kind == kind))

    # Text
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of text; by default special tokens parsed and no BOS added (templates and prompts carry
        their own). add_bos=True, special=False tokenize a document as llama.cpp's tools do (`common_tokenize(ctx, text,
        true)`): BOS first when the vocabulary adds one, special-token texts taken as plain text."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def added_bos(self) -> int | None:
        """The BOS token llama.cpp puts before a text (llama_vocab_get_add_bos), None when this vocab adds none."""
        lib = llama_cpp()
        adds = lib.llama_vocab_get_add_bos(lib.llama_model_get_vocab(self._llm.model))
        return self._llm.token_bos() if adds else None

    def detokenize(self, ids: list[int] | tuple[int, ...]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def special_token_texts(self) -> tuple[str, str]:
        """The texts of the model's BOS and EOS tokens (empty when it has none)."""
        def text(token: int) -> str:
            return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

        return text(self._llm.token_bos()), text(self._llm.token_eos())

    def chat_template(self) -> ChatTemplate:
        """The GGUF's chat template (compiled and checked once; TemplateError when missing or broken)."""
        if self._template is None:
            self._template = template_from_metadata(self.index.metadata, *self.special_token_texts(), self.path)
        return self._template

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return self.chat_template().render(messages, add_generation_prompt)

    # Generation
    def generate(self, prompt: str | list[int], max_tokens: int, *, sampling: Sampling | None = None,
                 keep_state: bool = False, ignore_eos: bool = False, interruptible: bool = True,
                 stop: Sequence[str] = ()) -> Stream:
        """A stream of the text generated after prompt (text or token ids); iterate it, then read .result.

        keep_state reuses the KV cache for the prompt's prefix that is already evaluated (a conversation
        whose new prompt extends the last); ignore_eos always decodes max_tokens (benchmarks); the stream ends
        before the first of the `stop` strings (result.finish_reason "stop"). sampling.grammar constrains the
        tokens (GrammarError when llama.cpp refuses it)."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return Stream(self._llm, self.rotation, ids, max_tokens, sampling or Sampling(), keep_state=keep_state,
                      ignore_eos=ignore_eos, interruptible=interruptible, on_finish=self._finished,
                      cache=self._cache, stop=stop)

    def complete(self, prompt: str | list[int], max_tokens: int, *, sampling: Sampling | None = None,
                 keep_state: bool = False, ignore_eos: bool = False, stop: Sequence[str] = ()) -> Generation:
        """generate(), drained: the whole generation at once (Ctrl-C propagates)."""
        return self.generate(prompt, max_tokens, sampling=sampling, keep_state=keep_state, ignore_eos=ignore_eos,
                             interruptible=False, stop=stop).drain()

    def _finished(self, generation: Generation) -> None:
        self.last = generation

    def evaluate(self, ids: list[int], *, append: bool = False) -> None:
        """Evaluate tokens with no sampling and no rotation step: from an empty cache, or after what is
        already evaluated (append=True). logits() then reads the last token's."""
        if not append:
            self._cache.reuse(ids, keep_state=False)
        evaluate(self._llm, list(ids))

    def evaluate_logits(self, ids: list[int], first: int = 0) -> np.ndarray:
        """Evaluate tokens from an empty cache, like evaluate(), and return the logits of positions
        first..len(ids)-1 (float32, one row each; llama.cpp computes no others)."""
        self._cache.reuse(list(ids), keep_state=False)
        return evaluate_logits(self._llm, list(ids), first)

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated token, read from llama.cpp."""
        if self._llm.n_tokens == 0:
            raise RotaryError("no logits yet: nothing has been evaluated")
        ptr = llama_cpp().llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._llm.n_vocab(),)).copy()

    def reset(self) -> None:
        """Forget the evaluated tokens (the next prompt is evaluated whole)."""
        self._llm.reset()
        self._cache.clear()
        llama_cpp().llama_memory_clear(llama_cpp().llama_get_memory(self._llm.ctx), True)

    # Accounting
    def rotary_stats(self) -> RotaryStats | None:
        return rotary_stats(self.rotation, self.rotation.plugin.description) if self.rotation else None

    def stats(self) -> EngineStats:
        t = sample_telemetry()
        return EngineStats(self.last, t.rss_bytes, t.rss_bytes - self.rss_before_load, t.vram_used_bytes,
                           t.vram_total_bytes, self.rotary_stats())

    def dry_run(self) -> tuple[Buffer, ...]:
        return dry_run(self.path, self.placement, self.options)

    # Lifetime
    def close(self, failed: bool = False) -> None:
        """Free the context and model, then the scheduler state; a trace is kept (or discarded if failed)."""
        if self._llm is None:
            return
        self._llm.close()
        self._llm = None
        if self.rotation is not None:
            scheduler.close_scheduler(self.rotation)
        if self._trace is not None:
            self._trace.discard() if failed else self._trace.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, failure: type[BaseException] | None, *_: Any) -> None:
        self.close(failed=failure is not None)


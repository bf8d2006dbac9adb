"""One scheduler state per model (native/backend.cpp): a second model state, opened or loaded, leaves the
first one's slots, counters and routing alone; two rotary models in one process generate what each does
alone. On the CPU stand-in device, through the ctypes binding and the real llama.cpp."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from rotary_gguf.gguf import open_index
from rotary_gguf.plugin import LayerStats, ModelScheduler, PluginError, SchedulerStats
from rotary_gguf.runtime import scheduler_plugin
from rotary_gguf.runtime.llama import llama_cpp

PROMPT = list(range(10, 30))


def _llama(path: Path):
    """A plain llama.cpp context of the model (CPU build: every weight in host memory). logits_all: without it
    llama-cpp-python 0.3.36's eval leaves `scores` unwritten."""
    return llama_cpp().Llama(model_path=str(path), n_ctx=256, n_threads=2, n_threads_batch=2, logits_all=True,
                             verbose=False)


def _open(path: Path, slots: int) -> ModelScheduler:
    """A state for the model with `slots` slots per layer, experts 0.. resident; the next context takes it."""
    state = scheduler_plugin().open_model(open_index(path))
    for layer in state.layers:
        state.set_resident(layer, list(range(state.set_slots(layer, slots))))
    state.set_recording(True)
    return state


def _counters(state: ModelScheduler) -> tuple[list[LayerStats], SchedulerStats]:
    return [state.layer_stats(layer) for layer in state.layers], state.stats()


def _eval(llm, tokens: list[int]) -> np.ndarray:
    llm.eval(tokens)
    logits = np.array(llm.scores[llm.n_tokens - 1])
    assert np.isfinite(logits).all() and logits.any()
    return logits


def test_second_state_leaves_the_first_alone(stand_in, tiny_model, arch_models):
    other = next(iter(arch_models.values()))
    with _open(tiny_model, 3) as first:
        llm = _llama(tiny_model)
        assert first.contexts == 1
        logits = _eval(llm, PROMPT)
        before = _counters(first)
        assert sum(s.device_pairs for s in before[0]) > 0 and before[1].graph_calls > 0
        routing = {layer: first.take_routing(layer) for layer in first.layers}
        assert all(len(ids) for ids in routing.values())

        with _open(other, 2) as second:  # opened, configured, closed: never taken by a context
            assert second.contexts == 0 and second.layers
        assert _counters(first) == before
        unused = _llama(tiny_model)  # a context created with no state attached claims nothing
        _eval(unused, PROMPT)
        unused.close()
        assert _counters(first) == before

        first.reset_stats()
        llm.reset()
        assert np.array_equal(_eval(llm, PROMPT), logits)  # same residents, same slots
        again = _counters(first)
        assert [(s.device_pairs, s.host_pairs, s.counts) for s in again[0]] == \
               [(s.device_pairs, s.host_pairs, s.counts) for s in before[0]]
        assert all(np.array_equal(first.take_routing(layer), ids) for layer, ids in routing.items())
        llm.close()
        assert first.contexts == 0


def test_state_outlives_its_handle_in_a_context(stand_in, tiny_model):
    state = _open(tiny_model, 2)
    llm = _llama(tiny_model)
    logits = _eval(llm, PROMPT)
    state.close()  # the context still holds the state: its slots keep serving
    llm.reset()
    assert np.array_equal(_eval(llm, PROMPT), logits)
    llm.close()
    with pytest.raises(PluginError, match="closed"):
        state.stats()


@pytest.mark.parametrize("slots", [2, 5])
def test_two_rotary_models_interleaved_equal_each_alone(stand_in, tiny_model, arch_models, open_engine, slot_budget,
                                                        slots):
    """Each model's tokens, hits, misses and rotation (a fixed copy budget: the same decisions) are those of
    the model alone, while the other decodes between its tokens."""
    paths = (tiny_model, arch_models["olmoe"])  # qwen3moe f32 and olmoe q8_0

    def open_(path: Path):
        return open_engine(path, "rtx4060-laptop-8gb", "rotary", ctx=256, vram_budget=slot_budget(path, slots),
                           copy_budget=1 << 30)

    alone = []
    for path in paths:
        engine = open_(path)
        alone.append((engine.complete("the quick brown fox", 16).tokens, engine.stats().rotary))
        engine.close()
    engines = [open_(path) for path in paths]
    streams = [engine.generate("the quick brown fox", 16) for engine in engines]
    for _ in itertools.zip_longest(*streams):  # one piece of each in turn
        pass
    for stream, engine, (tokens, stats) in zip(streams, engines, alone, strict=True):
        together = engine.stats().rotary
        assert stream.result.tokens == tokens
        assert together.expert_reads_device > 0 and together.slots == {"0": slots, "1": slots}
        assert together.per_layer == stats.per_layer  # its own slots, counters and rotation

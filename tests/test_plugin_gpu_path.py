"""The plugin's GPU path, checked on the CPU stand-in where it can be (issue 17): slots cleared at allocation,
prompt routing counted for batches the plugin leaves to llama.cpp, residents that only move not copied, the
copy path's device calls on the compute thread only, chunked copies, one wait per split block, the boundary
buffer type; and `gpu`-marked variants of the equality tests with stated tolerances (run only with a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rotary_gguf.gguf import open_index
from rotary_gguf.profile import load_profile
from rotary_gguf.runtime import Engine, EngineOptions, prepare

PROMPT = list(range(10, 58))  # 48 tokens: one prompt batch
GPU_PROFILE = load_profile("rtx4060-laptop-8gb")
CHUNK = 256 * 1024
# On a GPU, quantized activations (MMQ) and another summation order change the logits a little: a logit may
# differ by this much from llama.cpp's own GPU run without the plugin, and the top-5 tokens must agree.
GPU_LOGIT_BOUND = 0.05  # of the largest |logit|
GPU_TOP_K = 5


@pytest.fixture
def load():
    """load(path, strategy, slots=0, **options) -> Engine with `slots` slots per layer, closed at teardown."""
    opened: list[Engine] = []

    def open_with(path: Path, strategy: str, slots: int = 0, **options) -> Engine:
        fields = {"ctx": 256, "threads": 2, "vram_budget": 4 * 2**30, **options}
        setup = prepare(path, GPU_PROFILE, strategy, EngineOptions(**fields), runnable=False)
        placement = replace(setup.placement,
                            expert_slots=tuple((layer, slots) for layer, _ in setup.placement.expert_slots))
        engine = Engine.from_setup(replace(setup, placement=placement))
        opened.append(engine)
        return engine

    yield open_with
    for engine in opened:
        engine.close()


def _counts(engine: Engine) -> dict[int, tuple[int, ...]]:
    return {s.layer: s.counts for s in engine.rotation.layer_stats()}


def test_slots_are_cleared_at_allocation(stand_in, wide_arch_models, load):
    """Finding 7: a slot never filled reads as zeros, also when its memory held experts before."""
    model = load(wide_arch_models[("qwen3moe", "q8_0")], "rotary", 3)
    plugin = model.rotation.plugin
    size = open_index(model.path).slot_bytes(0)
    for _ in range(3):
        plugin.set_resident(0, [0, 1, 2])
        assert plugin.read_slot(0, 2, size) != bytes(size)
        plugin.set_slots(0, 3)  # freed and allocated again: likely the same memory
        assert plugin.read_slot(0, 2, size) == bytes(size)


def test_prompt_routing_is_counted_above_the_batch_threshold(stand_in, wide_arch_models, load):
    """Finding 2: a prompt batch left whole to llama.cpp (above max_batch) is counted by the plugin's eval
    callback exactly as the plugin counts the batches it computes itself."""
    path = wide_arch_models[("qwen3moe", "q8_0")]
    claimed = load(path, "rotary", 3)
    claimed.rotation.plugin.reset_stats()
    claimed.evaluate(PROMPT)
    left = load(path, "rotary", 3, max_batch=8)
    plugin = left.rotation.plugin
    plugin.reset_stats()
    left.evaluate(PROMPT)
    assert _counts(left) == _counts(claimed)
    # Layer 0's 48 tokens x 2 experts by the callback; the last layer routes only the output token (1 < 8),
    # which the plugin computes and counts itself.
    assert plugin.stats().prompt_selections == len(PROMPT) * 2
    assert plugin.stats().graph_calls == 1


def test_prompt_seeding_works_above_the_batch_threshold(stand_in, wide_arch_models, load):
    path = wide_arch_models[("qwen3moe", "q8_0")]
    claimed, left = load(path, "rotary", 3), load(path, "rotary", 3, max_batch=8)
    for model in (claimed, left):
        model.complete(PROMPT, 0)
    assert {layer: sorted(s) for layer, s in left.rotation.rotator.expert_in.items()} == \
        {layer: sorted(s) for layer, s in claimed.rotation.rotator.expert_in.items()}


def test_residents_that_only_move_are_not_copied(stand_in, wide_arch_models, load):
    """Finding 6: residents keep their slots; only newcomers are copied, through the copier."""
    model = load(wide_arch_models[("qwen3moe", "q8_0")], "rotary", 3)
    rotator, plugin = model.rotation.rotator, model.rotation.plugin
    size = open_index(model.path).slot_bytes(0)
    rotator.set_resident(0, [4, 5, 6])
    before = [plugin.read_slot(0, k, size) for k in range(3)]
    plugin.reset_stats()
    rotator.set_resident(0, [6, 4, 5])
    assert plugin.stats().resident_bytes == 0 and list(rotator.expert_in[0]) == [4, 5, 6]
    rotator.set_resident(0, [7, 6, 4])
    assert plugin.stats().resident_bytes == size and list(rotator.expert_in[0]) == [4, 7, 6]
    assert plugin.read_slot(0, 0, size) == before[0] and plugin.read_slot(0, 2, size) == before[2]
    assert plugin.stats().copy_chunks >= -(-size // CHUNK)


def test_copy_path_calls_the_device_from_the_compute_thread_only(stand_in, wide_arch_models, load):
    """Findings 1 and 5: with rotation forced by a small copy budget, every device call of the copy path is
    made on the compute thread; the copier moves chunks of at most 256 KiB; staging is allocated at slot
    set-up, never during decode; the copier's rate is measured."""
    path = wide_arch_models[("qwen3moe", "q8_0")]
    size = open_index(path).slot_bytes(0)
    model = load(path, "rotary", 3, copy_budget=2 * size)
    plugin = model.rotation.plugin
    allocated = plugin.stats().host_allocs
    reference = load(path, "experts-on-host").complete(PROMPT, 24, ignore_eos=True).tokens
    tokens = model.complete(PROMPT, 24, ignore_eos=True).tokens
    stats = plugin.stats()
    assert tokens == reference
    assert sum(s.admissions for s in model.rotation.layer_stats()) > 0
    assert stats.off_thread_calls == 0
    assert stats.copy_chunks > 0 and stats.copy_bytes <= stats.copy_chunks * CHUNK
    assert stats.copy_gbs and stats.copy_gbs > 0 and model.rotation.copy_gbs
    assert stats.host_allocs == allocated + 1  # the device worker's staging, once, at its first block
    assert stats.staging_bytes >= 16 * CHUNK


def test_one_wait_per_split_block(stand_in, wide_arch_models, load):
    """Finding 3: a decoded token's split block costs one wait on the device and three transfers (input rows,
    ids, output rows), all issued before the host's part runs."""
    model = load(wide_arch_models[("qwen3moe", "q8_0")], "rotary", 3, rotate=False)
    model.evaluate(PROMPT)
    for layer in model.rotation.slots:
        model.rotation.plugin.set_resident(layer, [0, 1, 2])
    plugin = model.rotation.plugin
    plugin.reset_stats()
    model.evaluate([int(np.argmax(model.logits()))], append=True)
    stats = plugin.stats()
    assert stats.split_matmuls == 2  # one chained block per MoE layer
    assert stats.device_syncs == stats.split_matmuls
    assert stats.transfers == 3 * stats.split_matmuls


def test_boundary_buffer_type_is_reported_after_load(stand_in, wide_arch_models, load):
    """Finding 4: the context's device reports the slot device's host buffer type (the CPU's own on the
    stand-in); the loader saw the CPU type, so the weights stayed in the mmap."""
    model = load(wide_arch_models[("qwen3moe", "q8_0")], "rotary", 3)
    assert model.rotation.plugin.boundary_buffer_type == "CPU"


def test_gpu_first_checks_cpu_mode(stand_in, wide_arch_models, tmp_path):
    """scripts/gpu_first_checks.sh --cpu: the five checks pass on the stand-in (on a model the suite has)."""
    script = Path(__file__).parents[1] / "scripts" / "gpu_first_checks.sh"
    report = tmp_path / "report.md"
    model = wide_arch_models[("qwen3moe", "q8_0")]
    done = subprocess.run(["bash", str(script), "--cpu", "--model", str(model), "--report", str(report)],
                          capture_output=True, text=True, env={**os.environ, "ROTARY_PYTHON": sys.executable},
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    text = report.read_text()
    for check in ("1 split assignment", "2 rotation", "3 decode", "4 prompt routing", "5 copier"):
        assert check in text
    assert "FAIL" not in text


# On a GPU: the same comparisons as tests/test_plugin.py, with the tolerances a GPU gives.

def _top(logits: np.ndarray) -> list[int]:
    return list(np.argsort(-logits)[:GPU_TOP_K])


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [0, 3, 8])
def test_gpu_logits_within_bound(wide_arch_models, load, slots):
    path = wide_arch_models[("qwen3moe", "q8_0")]
    reference = load(path, "experts-on-host")
    reference.evaluate(PROMPT)
    expected = reference.logits()
    model = load(path, "rotary", slots)
    model.evaluate(PROMPT)
    got = model.logits()
    assert np.all(np.isfinite(got))
    assert np.abs(got - expected).max() <= GPU_LOGIT_BOUND * np.abs(expected).max()
    assert _top(got) == _top(expected)


@pytest.mark.gpu
def test_gpu_greedy_tokens_agree_in_top_k(wide_arch_models, load):
    path = wide_arch_models[("qwen3moe", "q4_k_m")]
    reference = load(path, "experts-on-host")
    model = load(path, "rotary", 3)
    tokens = reference.complete(PROMPT, 32, ignore_eos=True).tokens
    model.evaluate(PROMPT)
    for token in tokens:  # the plugin's top-k holds llama.cpp's choice at every step of its own sequence
        assert token in _top(model.logits())
        model.evaluate([token], append=True)


@pytest.mark.gpu
def test_gpu_boundary_buffer_is_pinned(wide_arch_models, load):
    model = load(wide_arch_models[("qwen3moe", "q8_0")], "rotary", 3)
    assert model.rotation.plugin.boundary_buffer_type.endswith("_Host")
    assert model.rotation.plugin.stats().off_thread_calls == 0


# The per-token cost model behind `rotary plan --json` candidates and --placement auto.

def test_plan_json_has_candidates_and_auto_follows_them(real_shapes_header):
    from click.testing import CliRunner

    from rotary_gguf.cli import main

    args = ["plan", str(real_shapes_header), "--profile", "rtx4060-laptop-8gb", "--json"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    listed = json.loads(plain.stdout)["candidates"]
    assert [c["placement"] for c in listed] == ["layer-fill", "experts-on-host", "rotary"]
    assert all(c["predicted_decode_tok_s"] > 0 for c in listed)
    rotary = listed[2]
    assert 0 < rotary["hit_rate"] <= 1 and rotary["break_even_hit_rate"] >= 0
    auto = CliRunner().invoke(main, [*args, "--placement", "auto"])
    assert auto.exit_code == 0, auto.output
    best = max(listed, key=lambda c: (c["predicted_decode_tok_s"], c["placement"] != "rotary"))
    assert json.loads(auto.stdout)["strategy"] == best["placement"]
    assert "note: auto: " + best["placement"] in auto.stderr


def test_rotary_is_chosen_only_above_its_break_even(real_shapes_header):
    from rotary_gguf import cost

    index = open_index(real_shapes_header)
    placement = prepare(real_shapes_header, GPU_PROFILE, "rotary", EngineOptions(), runnable=False).placement
    listed = cost.candidates(index, GPU_PROFILE)
    rotary = listed[2]
    best_other = max(c.predicted_decode_tok_s for c in listed[:2])
    assert rotary.break_even_hit_rate is not None
    above = cost.predict_decode_tok_s(index, placement, GPU_PROFILE, min(1.0, rotary.break_even_hit_rate + 0.05))
    below = cost.predict_decode_tok_s(index, placement, GPU_PROFILE, max(0.0, rotary.break_even_hit_rate - 0.05))
    assert below < best_other < above
    faster = (*listed[:2], cost.Candidate("rotary", best_other * 1.1, 0.9, rotary.break_even_hit_rate))
    assert cost.choose(faster)[0] == "rotary"
    assert cost.choose(faster, rotary_runs=False)[0] != "rotary"
    assert "break-even" in cost.choose(listed)[1]


@pytest.mark.gpu
def test_gpu_prefetch_decides_as_the_simulator(wide_arch_models, load, tmp_path):
    """Prefetch on a GPU: the copies land before their layer and the hits are the simulator's, exactly."""
    from rotary_gguf.gguf import open_index
    from rotary_gguf.profile import load_profile
    from rotary_gguf.simulate import simulate
    from rotary_gguf.trace import read_trace

    path = wide_arch_models[("qwen3moe", "q8_0")]
    budget = 2 * open_index(path).slot_bytes(0)
    model = load(path, "rotary", 3, policy="hybrid", copy_budget=budget, trace=tmp_path / "gpu.rtrc")
    model.complete(PROMPT, 48, ignore_eos=True)
    stats = model.rotation.layer_stats()
    hits = sum(s.device_pairs for s in stats)
    assert sum(s.prefetches for s in stats) > 0 and model.rotation.plugin.stats().off_thread_calls == 0
    model.close()
    trace = read_trace(tmp_path / "gpu.rtrc")
    result = simulate(trace, 3, "hybrid", load_profile("rtx4060-laptop-8gb"), budget_bytes=budget, prefetch=True)
    assert hits / (trace.decode_steps * len(trace.header.layers) * trace.header.n_expert_used) == result.hit_rate

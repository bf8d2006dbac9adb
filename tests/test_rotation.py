"""Expert rotation on the CPU stand-in: outputs never change, the simulator reproduces the plugin's hits on
the trace the plugin recorded, the copy budget holds, traces round-trip, replay substitutes routing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rotary_gguf.bench import WARMUP_TOKENS
from rotary_gguf.cli import main
from rotary_gguf.gguf import open_index
from rotary_gguf.profile import load_profile
from rotary_gguf.rotation import POLICIES, LayerShape, Rotator, make_policy
from rotary_gguf.runtime import Engine, EngineOptions
from rotary_gguf.simulate import simulate
from rotary_gguf.synth import ARCHITECTURES
from rotary_gguf.trace import TraceError, read_trace, synthetic_trace, write_trace

PROFILE = load_profile("rtx4060-laptop-8gb")


@pytest.fixture
def rotary(open_engine, slot_budget):
    """rotary(path, slots, **options) -> an engine with `slots` slots per layer on the laptop profile."""
    def open_with(path: Path, slots: int, **options) -> Engine:
        return open_engine(path, "rtx4060-laptop-8gb", "rotary", ctx=256, threads=2,
                           vram_budget=slot_budget(path, slots), **options)

    return open_with


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rotation_never_changes_outputs(stand_in, wide_arch_models, arch, rotary, open_engine, prompt_ids):
    path = wide_arch_models[(arch, "q8_0")]
    plain = open_engine(path, "rtx4060-laptop-8gb", "experts-on-host", ctx=256, threads=2)
    reference = plain.complete(prompt_ids, 64, ignore_eos=True).tokens
    model = rotary(path, 3, policy="lru")
    assert set(model.rotation.slots.values()) == {3}
    tokens = model.complete(prompt_ids, 64, ignore_eos=True).tokens
    stats = model.rotation.layer_stats()
    assert tokens == reference
    assert sum(s.evictions for s in stats) > 10  # the slots churned all along
    assert sum(s.prefetches for s in stats) > 10  # and prefetches landed ahead of their layers


@pytest.mark.parametrize("policy", POLICIES)
def test_simulator_reproduces_the_plugin_on_its_trace(stand_in, wide_arch_models, tmp_path, policy, slot_budget,
                                                     prompt_ids):
    path = wide_arch_models[("qwen3moe", "q8_0")]
    budget = 2 * open_index(path).slot_bytes(0)  # two experts per token: the budget binds
    options = EngineOptions(ctx=256, threads=2, vram_budget=slot_budget(path, 3), policy=policy, copy_budget=budget,
                            trace=tmp_path / "run.rtrc")
    with Engine.open(path, "rtx4060-laptop-8gb", "rotary", options) as model:
        plugin_hits = 0
        for prompt in (prompt_ids, prompt_ids[::-1]):  # two requests (the plugin's counters restart with each)
            model.complete(prompt, 40, ignore_eos=True)
            plugin_hits += sum(s.device_pairs for s in model.rotation.layer_stats())
        rotator = model.rotation.rotator
        copied = sum(s.bytes_copied for s in model.rotation.layer_stats())
    trace = read_trace(tmp_path / "run.rtrc")  # written when the engine closed
    assert trace.decode_steps == 80
    result = simulate(trace, 3, policy, PROFILE, budget_bytes=budget, prefetch=True)
    assert plugin_hits / (80 * 2 * 2) == result.hit_rate  # exactly: the same decisions on the same routing
    assert trace.has_predictions and result.prefetches_per_token > 0  # with the plugin's prefetches
    assert max(rotator.copied_per_token) <= budget and max(rotator.copied_per_token) > 0
    assert copied == sum(rotator.copied_per_token[-40:])


def test_budget_bounds_copies_per_token():
    trace = synthetic_trace(layers=4, n_expert=32, n_used=4, requests=2, prompt_tokens=8, decode_tokens=60,
                            slot_bytes=1000)
    layers = {layer: LayerShape(32, 4, 8, 1000) for layer in range(4)}
    for budget in (0, 1000, 3500, None):
        rotator = Rotator(layers, make_policy("lru", layers), lambda b=budget: b)
        for phase, routing in trace.steps:
            (rotator.after_prompt if phase == "prompt" else rotator.after_token)(routing)
        assert all(budget is None or c <= budget for c in rotator.copied_per_token)
        assert (sum(rotator.copied_per_token) == 0) == (budget == 0)


def test_trace_round_trips_and_rejects_damage(tmp_path):
    trace = synthetic_trace(layers=3, n_expert=300, n_used=4, requests=1, prompt_tokens=5, decode_tokens=7)
    path = write_trace(tmp_path / "t.rtrc", trace)
    back = read_trace(path)
    assert back.header == trace.header and back.header.synthetic and back.header.id_dtype.itemsize == 2
    assert [p for p, _ in back.steps] == ["prompt"] + ["decode"] * 7
    for (_, a), (_, b) in zip(trace.steps, back.steps, strict=True):
        assert all(np.array_equal(a[layer], b[layer]) for layer in a)
    data = path.read_bytes()
    (tmp_path / "cut.rtrc").write_bytes(data[:-3])
    (tmp_path / "bad.rtrc").write_bytes(b"GGUF" + data[4:])
    with pytest.raises(TraceError, match="truncated trace"):
        read_trace(tmp_path / "cut.rtrc")
    with pytest.raises(TraceError, match="not a rotary routing trace"):
        read_trace(tmp_path / "bad.rtrc")
    out = CliRunner().invoke(main, ["simulate", str(tmp_path / "cut.rtrc"), "--slots", "4"])
    assert out.exit_code == 2 and out.stderr.count("\n") == 1 and "truncated trace" in out.stderr


def test_simulate_cli_json_and_plot(tmp_path):
    runner = CliRunner()
    made = runner.invoke(main, ["trace", "synth", str(tmp_path / "s.rtrc"), "--layers", "4", "--requests", "1",
                                "--decode-tokens", "40"])
    assert made.exit_code == 0, made.output
    out = runner.invoke(main, ["simulate", str(tmp_path / "s.rtrc"), "--vram", "400MiB", "--policy", "lfu",
                               "--json", "--plot", str(tmp_path / "curve.png")])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["slots"] == 400 * 2**20 // (4 * 1_769_472) and result["policy"] == "lfu"
    assert 0 < result["hit_rate"] < 1 and result["bytes_copied_per_token"] > 0 and result["trace_kind"] == "synthetic"
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    both = runner.invoke(main, ["simulate", str(tmp_path / "s.rtrc")])
    assert both.exit_code == 2 and "exactly one of --slots and --vram" in both.stderr


def test_replay_substitutes_the_traces_routing(stand_in, wide_arch_models, tmp_path):
    path = wide_arch_models[("qwen3moe", "q8_0")]
    trace = synthetic_trace(layers=2, n_expert=8, n_used=2, requests=1, prompt_tokens=4, decode_tokens=400)
    write_trace(tmp_path / "replay.rtrc", trace)
    out = CliRunner().invoke(main, ["bench", str(path), "--placement", "rotary", "--profile", "rtx4060-laptop-8gb",
                                    "--ctx", "256", "--prompt-tokens", "16", "--tokens", "8", "--threads", "2",
                                    "--replay", str(tmp_path / "replay.rtrc"), "--trace", str(tmp_path / "seen.rtrc"),
                                    "-r", "1", "--json"])
    assert out.exit_code == 0, out.output
    rotary = json.loads(out.stdout)["placements"][0]["rotary"]
    assert rotary["routing"].startswith("replayed from replay.rtrc (synthetic trace; outputs are not the model's)")
    seen = read_trace(tmp_path / "seen.rtrc")
    assert seen.decode_steps == WARMUP_TOKENS + 8  # the warm-up request, then the measured one
    # Layer 0 routes every token of both prompts and every decoded token: the replayed ids, in order.
    replayed = np.concatenate([routing[0] for _, routing in trace.steps])
    recorded = np.concatenate([routing[0] for _, routing in seen.steps])
    assert np.array_equal(recorded, replayed[:len(recorded)])


def test_trace_show_and_plugin_status(stand_in, tmp_path):
    runner = CliRunner()
    write_trace(tmp_path / "t.rtrc", synthetic_trace(layers=2, n_expert=8, n_used=2, requests=1, decode_tokens=5))
    shown = json.loads(runner.invoke(main, ["trace", "show", str(tmp_path / "t.rtrc")]).stdout)
    assert shown["synthetic"] and shown["decode_steps"] == 5 and shown["n_expert"] == 8
    status = runner.invoke(main, ["plugin", "status"])
    assert status.exit_code == 0 and "; llama-cpp-python 0.3.36; ggml backend API" in status.output
    assert "slots on CPU" in status.output


def test_prompt_seeding_leaves_staying_experts_in_their_slots():
    layers = {0: LayerShape(16, 2, 4, 1000)}
    rotator = Rotator(layers, make_policy("hybrid", layers))
    rotator.after_prompt({0: np.array([1, 2, 3, 4, 1, 2, 3, 4], np.int32)})
    before = rotator.expert_in[0].copy()
    rotator.after_prompt({0: np.array([9, 9, 3, 3, 1, 1, 10, 10], np.int32)})  # 1 and 3 stay; 9 and 10 come in
    after = rotator.expert_in[0]
    assert set(after.tolist()) == {1, 3, 9, 10}
    for slot, expert in enumerate(before.tolist()):
        if expert in (1, 3):
            assert after[slot] == expert  # not copied again
    assert all(rotator.slot_of[0][e] == s for s, e in enumerate(after.tolist()))

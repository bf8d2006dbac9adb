"""The rotary scheduler plugin on the CPU stand-in device: outputs equal llama.cpp's without it, for every
layout, type and slot count; its routing counts equal an eval callback's; missing or foreign builds fall back."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rotary_gguf.cli import main
from rotary_gguf.plugin import Plugin, PluginError, plugin_path
from rotary_gguf.profile import load_profile
from rotary_gguf.runtime import Engine, EngineOptions, prepare
from rotary_gguf.synth import ARCHITECTURES

PROMPT = list(range(10, 58))  # 48 tokens of the embedded vocabulary: one prompt batch
GPU_PROFILE = load_profile("rtx4060-laptop-8gb")


@pytest.fixture
def load():
    """load(path, strategy, slots=0, **options) -> Engine with exactly `slots` slots per layer (odd experts
    resident first), closed at teardown."""
    opened: list[Engine] = []

    def open_with(path: Path, strategy: str, slots: int = 0, **options) -> Engine:
        setup = prepare(path, GPU_PROFILE, strategy, EngineOptions(ctx=256, threads=2, vram_budget=4 * 2**30,
                                                                  **options), runnable=False)
        placement = replace(setup.placement,
                            expert_slots=tuple((layer, slots) for layer, _ in setup.placement.expert_slots))
        engine = Engine.from_setup(replace(setup, placement=placement))
        opened.append(engine)
        if engine.rotation:
            for layer, n in engine.rotation.slots.items():
                odd_first = sorted(range(engine.rotation.plugin.n_expert(layer)), key=lambda e: (e % 2 == 0, e))
                engine.rotation.plugin.set_resident(layer, odd_first[:n])
        return engine

    yield open_with
    for engine in opened:
        engine.close()


def _logits(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Logits after the prompt batch and after one decoded token."""
    engine.evaluate(PROMPT)
    batch = engine.logits()
    engine.evaluate([int(np.argmax(batch))], append=True)
    return batch, engine.logits()


def _split(engine: Engine) -> tuple[int, int]:
    stats = engine.rotation.layer_stats()
    return sum(s.device_pairs for s in stats), sum(s.host_pairs for s in stats)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_f32_logits_equal_without_plugin(stand_in, wide_arch_models, arch, load):
    path = wide_arch_models[(arch, "f32")]
    reference = _logits(load(path, "experts-on-host"))
    for slots in (0, 3, 8):
        model = load(path, "rotary", slots)
        model.rotation.plugin.reset_stats()
        batch, decode = _logits(model)
        device, host = _split(model)
        assert np.abs(batch - reference[0]).max() <= 1e-5, (arch, slots)
        assert np.abs(decode - reference[1]).max() <= 1e-5, (arch, slots)
        assert (device > 0) == (slots > 0) and (host > 0) == (slots < 8), (arch, slots, device, host)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_tokens_equal_without_plugin(stand_in, wide_arch_models, arch, qtype, load):
    path = wide_arch_models[(arch, qtype)]
    reference = load(path, "experts-on-host").complete(PROMPT, 64, ignore_eos=True).tokens
    for slots in (0, 3, 8):
        model = load(path, "rotary", slots)
        # The rotation seeds the slots from the prompt's routing before the decode starts.
        tokens = model.complete(PROMPT, 64, ignore_eos=True).tokens
        device, host = _split(model)
        assert tokens == reference, (arch, qtype, slots)
        assert device + host == 64 * 2 * 2  # decoded tokens x layers x experts used
        assert (device > 0) == (slots > 0) and (host > 0) == (slots < 8), (arch, qtype, slots, device, host)


class _Tensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h) up to its name."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def _eval_callback_counts(load, path: Path, tokens: list[int]) -> dict[int, Counter]:
    """Expert selections per layer read from every ffn_moe_topk node by llama.cpp's eval callback."""
    import llama_cpp

    counts: dict[int, Counter] = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def callback(tensor_ptr, ask, user_data):
        t = _Tensor.from_address(tensor_ptr)
        name = t.name.decode()
        if not name.startswith("ffn_moe_topk-"):
            return False
        if not ask:
            layer = counts.setdefault(int(name.rsplit("-", 1)[1]), Counter())
            for token in range(t.ne[1]):
                for slot in range(t.ne[0]):
                    layer[ctypes.c_int32.from_address(t.data + token * t.nb[1] + slot * t.nb[0]).value] += 1
        return True

    original = llama_cpp.llama_cpp.llama_context_default_params

    def with_callback():
        params = original()
        params.cb_eval = callback
        return params

    llama_cpp.llama_cpp.llama_context_default_params = with_callback
    try:
        model = load(path, "experts-on-host")
    finally:
        llama_cpp.llama_cpp.llama_context_default_params = original
    model.evaluate(tokens)
    return counts


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
def test_routing_counts_equal_an_eval_callback(stand_in, wide_arch_models, arch, load):
    path = wide_arch_models[(arch, "q8_0")]
    expected = _eval_callback_counts(load, path, PROMPT)
    model = load(path, "rotary", 3)
    model.rotation.plugin.reset_stats()
    model.evaluate(PROMPT)
    for stats in model.rotation.layer_stats():
        assert dict(enumerate(stats.counts)) == {e: expected[stats.layer][e] for e in range(len(stats.counts))}
        assert stats.device_pairs + stats.host_pairs == sum(expected[stats.layer].values())


def test_prompt_seeds_slots_with_its_most_used_experts(stand_in, wide_arch_models, load):
    path = wide_arch_models[("qwen3moe", "q8_0")]
    expected = _eval_callback_counts(load, path, PROMPT)
    model = load(path, "rotary", 3)
    model.complete(PROMPT, 0)  # the prompt only: no rotation yet
    for layer, resident in model.rotation.rotator.expert_in.items():
        n_expert = model.rotation.plugin.n_expert(layer)
        top = sorted((expected[layer][e] for e in range(n_expert)), reverse=True)[:3]
        assert sorted((expected[layer][e] for e in resident), reverse=True) == top


def test_plugin_api_errors_are_plugin_errors(stand_in, wide_arch_models, load):
    model = load(wide_arch_models[("qwen3moe", "q8_0")], "rotary", 3)
    plugin = model.rotation.plugin
    with pytest.raises(PluginError, match="out of range or repeated"):
        plugin.set_resident(0, [1, 1])
    with pytest.raises(PluginError, match="4 experts for 3 slots"):
        plugin.set_resident(0, [0, 1, 2, 3])
    with pytest.raises(PluginError, match="no configured expert tensors"):
        plugin.set_slots(99, 1)


def test_foreign_build_is_refused():
    with pytest.raises(PluginError, match=r"built as 'rotary-sched \d+; llama-cpp-python 0.3.36.*rotary plugin build"):
        Plugin(plugin_path(), "9.9.9")
    with pytest.raises(PluginError, match="cannot load the scheduler plugin"):
        Plugin(Path("/nonexistent/librotary_sched.so"), "0.3.36")


def _rotary_cli(tiny_model: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rotary_gguf", "run", str(tiny_model), "Hello", "-n", "4", "--temp", "0",
               "--profile", "rtx4060-laptop-8gb", "--placement", "rotary"]
    clean = {k: v for k, v in os.environ.items() if k not in ("ROTARY_SCHED_DEVICE", "ROTARY_PLUGIN")}
    return subprocess.run(command, capture_output=True, text=True, env={**clean, **env}, timeout=120)


@pytest.mark.parametrize("env, reason", [
    ({}, "rotary needs a GPU and this llama.cpp build has none"),
    ({"ROTARY_SCHED_DEVICE": "cpu", "ROTARY_PLUGIN": "/nonexistent/librotary_sched.so"},
     "cannot load the scheduler plugin"),
])
def test_rotary_falls_back_to_layer_fill_in_one_line(tiny_model, env, reason):
    done = _rotary_cli(tiny_model, env)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    assert len([n for n in notes if reason in n and n.endswith("using layer-fill")]) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_bench_json_reports_the_rotary_placement(stand_in, wide_arch_models, slot_budget):
    path = wide_arch_models[("qwen3moe", "q8_0")]
    budget = slot_budget(path, 3)
    out = CliRunner().invoke(main, ["bench", str(path), "--profile", "rtx4060-laptop-8gb", "--vram-budget",
                                    f"{budget}B", "--ctx", "256", "--prompt-tokens", "32", "--tokens", "16",
                                    "--threads", "2", "-r", "2", "--json"])
    assert out.exit_code == 0, out.output
    placements = {p["name"]: p for p in json.loads(out.stdout)["placements"]}
    assert set(placements) == {"layer-fill", "experts-on-host", "rotary"}
    rotary = placements["rotary"]
    assert rotary["rotary"]["slots"] == {"0": 3, "1": 3}
    assert rotary["expert_reads_device"] + rotary["expert_reads_host"] == 16 * 2 * 2
    assert 0 < rotary["hit_rate"] < 1
    assert rotary["predicted_vram_bytes"] <= budget


def test_repacked_host_experts_are_served(stand_in, wide_arch_models, load):
    """With llama.cpp's CPU repacking (--repack) the plugin still claims the expert FFN: with no slots it
    computes from the repacked copy exactly as llama.cpp does; slots compute from the file's layout."""
    path = wide_arch_models[("qwen3moe", "q4_k_m")]
    host = load(path, "experts-on-host", repack=True)
    assert any("CPU_REPACK" in line for line in host.log_lines)
    reference = _logits(host)
    for slots in (0, 8):
        model = load(path, "rotary", slots, repack=True)
        for layer, n in model.rotation.slots.items():
            model.rotation.plugin.set_resident(layer, list(range(n)))
        model.rotation.plugin.reset_stats()
        batch, _ = _logits(model)
        assert model.rotation.plugin.stats().graph_calls > 0
        if slots == 0:
            assert np.array_equal(batch, reference[0])
        else:
            assert _split(model)[1] == 0
            assert np.abs(batch - reference[0]).max() <= 0.05 * np.abs(reference[0]).max()


def test_large_prompt_batches_are_left_to_llama_cpp(stand_in, wide_arch_models, load):
    """Above the batch threshold (a GPU's: 32) the plugin claims nothing of a batch - not even the
    activations between the expert matmuls - and decode steps still come to it."""
    path = wide_arch_models[("qwen3moe", "f32")]
    reference = _logits(load(path, "experts-on-host"))
    model = load(path, "rotary", 3, max_batch=8)
    plugin = model.rotation.plugin
    plugin.reset_stats()
    model.evaluate(PROMPT)
    assert plugin.stats().graph_calls == 1  # only the last layer, which routes just the logits token
    batch = model.logits()
    model.evaluate([int(np.argmax(batch))], append=True)
    assert plugin.stats().graph_calls == 3  # then one split per MoE layer
    assert np.abs(batch - reference[0]).max() <= 1e-5
    assert np.abs(model.logits() - reference[1]).max() <= 1e-5


@pytest.mark.parametrize("arch, per_block", [("qwen3moe", 1), ("llama", 1), ("olmoe", 1), ("gpt-oss", 3)])
def test_expert_ffn_runs_as_one_chain(stand_in, wide_arch_models, arch, per_block, load):
    """gate, up, activation and down of the resident pairs run as one chain (one upload, one download per
    block on a GPU); gpt-oss's biased experts fall back to one matmul at a time."""
    model = load(wide_arch_models[(arch, "q8_0")], "rotary", 3)
    model.rotation.plugin.reset_stats()
    model.evaluate(PROMPT)
    assert model.rotation.plugin.stats().split_matmuls == 2 * per_block

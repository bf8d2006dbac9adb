"""The engine under every command: the rotary placement under every profile (no slots included), the
profile's rotation settings on every command, streams that stop cleanly, the KV cache reused across
turns, memory released on close, and `rotary bench` repetitions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from rotary_gguf.cli import main
from rotary_gguf.profile import profile_names
from rotary_gguf.runtime import Engine, EngineOptions, OptionsError, Sampling

FOX = "The quick brown fox"


def _run(*args: str) -> tuple[str, str]:
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


@pytest.mark.parametrize("profile", profile_names())
def test_rotary_matches_experts_on_host_under_every_profile(stand_in, wide_arch_models, profile):
    """cpu-only plans 0 slots per layer (the plugin only counts); the GPU profiles put every expert of the
    model in the stand-in's slots. Either way the text is experts-on-host's, token for token. (Heads of 64:
    the 4 GB profile's q8_0 KV cache needs a multiple of 32.)"""
    model = wide_arch_models[("qwen3moe", "f32")]
    common = [str(model), FOX, "-n", "24", "--temp", "0", "--profile", profile, "--ctx", "256"]
    reference, _ = _run(*common, "--placement", "experts-on-host")
    text, stderr = _run(*common, "--placement", "rotary")
    assert text == reference
    assert "rotary: " in stderr and "using layer-fill" not in stderr


@pytest.mark.parametrize("profile", ["cpu-only", "rtx3050-laptop-4gb"])
def test_rotary_matches_experts_on_host_on_the_small_model(stand_in, small_model, profile):
    common = [str(small_model), FOX, "-n", "24", "--temp", "0", "--profile", profile, "--ctx", "512"]
    reference, _ = _run(*common, "--placement", "experts-on-host")
    text, stderr = _run(*common, "--placement", "rotary")
    assert text == reference and "rotary: " in stderr


def test_run_names_the_profiles_policy_and_copy_budget(stand_in, tiny_model, slot_budget, tmp_path):
    budget = f"{slot_budget(tiny_model, 3)}B"
    common = [str(tiny_model), FOX, "-n", "8", "--temp", "0", "--placement", "rotary", "--ctx", "256",
              "--vram-budget", budget]
    _, stderr = _run(*common, "--profile", "rtx4060-laptop-8gb")
    assert "policy hybrid; copy budget 0.5 x PCIe 12 GB/s x measured token time" in stderr
    _, stderr = _run(*common, "--profile", "rtx4060-laptop-8gb", "--policy", "lfu", "--copy-budget", "1MiB")
    assert "policy lfu; copy budget 1048576 bytes per token (fixed)" in stderr
    custom = tmp_path / "laptop.yaml"
    custom.write_text((Path(__file__).parents[1] / "profiles" / "rtx4060-laptop-8gb.yaml").read_text()
                      .replace("pcie_gbs: 12 ", "pcie_gbs: 6 ") + "rotation_policy: lru\n")
    _, stderr = _run(*common, "--profile", str(custom))
    assert "policy lru; copy budget 0.5 x PCIe 6 GB/s x measured token time" in stderr


def test_engine_options_reach_the_rotator(stand_in, tiny_model, slot_budget, open_engine):
    engine = open_engine(tiny_model, "rtx4060-laptop-8gb", "rotary", ctx=256, vram_budget=slot_budget(tiny_model, 2),
                         policy="lru", copy_budget=4096)
    rotation = engine.rotation
    assert set(rotation.slots.values()) == {2}
    assert rotation.rotator.policy.name == "lru" and rotation.pcie_gbs == 12 and rotation.budget() == 4096
    engine.complete(FOX, 8, ignore_eos=True)
    stats = engine.stats().rotary
    assert stats.policy == "lru" and stats.copy_budget_bytes_per_token == 4096
    assert stats.bytes_copied_per_token <= 4096
    assert stats.device.startswith("rotary expert scheduler, slots on CPU")


def test_options_override_the_profile(tiny_model, open_engine):
    # The 4 GB profile's q8_0 KV cache needs heads of 32 (tiny's are 16): the option overrides its KV type.
    engine = open_engine(tiny_model, "rtx3050-laptop-4gb", "experts-on-host", ctx=256, kv_cache_type="f16")
    assert engine.options.kv_cache_type == engine.profile.kv_cache_type == "f16"
    assert engine.options.ubatch == 256 and engine.options.policy == "hybrid"  # the profile's
    assert engine.placement.kv_cache_type == "f16"


def test_no_slots_or_all_resident_do_not_rotate(stand_in, tiny_model, open_engine):
    none = open_engine(tiny_model, "cpu-only", "rotary", ctx=256)
    everything = open_engine(tiny_model, "rtx4060-laptop-8gb", "rotary", ctx=256)
    for engine, reason in ((none, "none (no slots)"), (everything, "none (every expert resident)")):
        engine.complete(FOX, 4, ignore_eos=True)
        stats = engine.stats().rotary
        assert not engine.rotation.rotate and stats.policy == stats.copy_budget == reason
    assert none.stats().rotary.expert_reads_device == 0 and everything.stats().rotary.expert_reads_host == 0


def test_bench_json_names_policy_and_copy_budget(stand_in, tiny_model, slot_budget):
    result = CliRunner().invoke(main, ["bench", str(tiny_model), "--profile", "rtx4060-laptop-8gb", "--placement",
                                       "rotary", "--vram-budget", f"{slot_budget(tiny_model, 3)}B", "--ctx", "256",
                                       "--prompt-tokens", "16", "--tokens", "8", "-r", "1", "--policy", "lfu",
                                       "--json"])
    assert result.exit_code == 0, result.output
    (placement,) = json.loads(result.stdout)["placements"]
    assert placement["policy"] == "lfu" and placement["copy_budget"].startswith("0.5 x PCIe 12 GB/s")
    assert placement["rotary"]["policy"] == "lfu"


def test_bench_repetitions_are_interleaved_with_spread(tiny_model):
    result = CliRunner().invoke(main, ["bench", str(tiny_model), "--profile", "cpu-only", "--ctx", "256",
                                       "--prompt-tokens", "16", "--tokens", "8", "-r", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["repetitions"] == 3 and data["isolated"] is False
    for placement in data["placements"]:
        assert len(placement["runs"]) == 3 and placement["repetitions"] == 3
        assert set(placement["decode_tok_s"]) == {"mean", "sd"} and placement["decode_tok_s"]["mean"] > 0
    table = CliRunner().invoke(main, ["bench", str(tiny_model), "--profile", "cpu-only", "--ctx", "256",
                                      "--prompt-tokens", "16", "--tokens", "8", "-r", "2"])
    assert "2 run(s) each, interleaved" in table.stdout and " ± " in table.stdout


def test_bench_isolated_runs_each_placement_in_a_child(tiny_model):
    result = CliRunner().invoke(main, ["bench", str(tiny_model), "--profile", "cpu-only", "--ctx", "256",
                                       "--placement", "experts-on-host", "--prompt-tokens", "16", "--tokens", "8",
                                       "-r", "2", "--isolate", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["isolated"] is True
    (placement,) = data["placements"]
    # The parent never loaded the model: its RSS did not grow by the model's.
    assert len(placement["runs"]) == 2 and placement["peak_rss_bytes"] > 0


def test_closing_an_engine_releases_its_memory(small_model):
    """The repacked copy of the experts (anonymous memory) is returned when the engine closes, so the next
    placement of a benchmark starts from the same RSS."""
    process = psutil.Process()
    before = process.memory_info().rss
    engine = Engine.open(small_model, "cpu-only", "experts-on-host", EngineOptions(ctx=256, repack=True))
    engine.complete(FOX, 4)
    loaded = process.memory_info().rss
    engine.close()
    after = process.memory_info().rss
    assert loaded - before > 64 * 2**20  # the repacked experts
    assert after - before < 32 * 2**20, (before, loaded, after)


def test_stream_stops_and_the_conversation_continues(tiny_model, open_engine):
    engine = open_engine(tiny_model, ctx=256)
    stream = engine.generate(FOX, 40, sampling=Sampling(temp=0), ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 4:
            stream.stop()
    stopped = stream.result
    assert stopped.interrupted and 5 <= len(stopped.tokens) < 40
    assert engine.last == stopped
    # The KV cache holds the prompt and every token of the stopped reply: extending it reuses all of them.
    prompt = engine.tokenize(FOX) + list(stopped.tokens)
    more = engine.complete(prompt, 4, keep_state=True, ignore_eos=True)
    fresh = engine.complete(prompt, 4, ignore_eos=True)
    assert more.cached_tokens == len(prompt) - 1 and fresh.cached_tokens == 0
    assert more.tokens == fresh.tokens


def test_closed_stream_keeps_what_was_generated(tiny_model, open_engine):
    engine = open_engine(tiny_model, ctx=256)
    stream = engine.generate(FOX, 40, ignore_eos=True)
    next(iter(stream))
    stream.close()
    assert stream.result.interrupted and engine.last is not None
    again = engine.complete(FOX, 6, keep_state=True, ignore_eos=True)
    assert again.tokens == engine.complete(FOX, 6, ignore_eos=True).tokens


def test_prompt_longer_than_the_context_is_an_error(tiny_model, open_engine):
    from rotary_gguf.runtime import ContextError

    engine = open_engine(tiny_model, ctx=32)
    with pytest.raises(ContextError, match="the context holds"):
        engine.complete(list(range(10, 60)), 4)


@pytest.mark.parametrize("field, value, message", [
    ("kv_cache_type", "q3", "unknown KV cache type"),
    ("policy", "random", "unknown rotation policy"),
    ("ctx", 0, "ctx must be at least 1"),
    ("copy_budget", -1, "copy_budget must not be negative"),
])
def test_bad_options_are_errors(field, value, message):
    with pytest.raises(OptionsError, match=message):
        EngineOptions(**{field: value})


def test_no_module_outside_the_runtime_imports_llama_cpp():
    package = Path(__file__).parents[1] / "rotary_gguf"
    imports = re.compile(r"^\s*(import llama_cpp|from llama_cpp[ .])", re.MULTILINE)
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if "runtime" not in p.relative_to(package).parts and imports.search(p.read_text())]
    assert offenders == []

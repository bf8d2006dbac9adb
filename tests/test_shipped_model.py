"""The shipped model (a small Qwen3-MoE trained on the Python standard library): the demo, perplexity on
code, and the rotary machinery on its real, skewed routing."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rotary_gguf.calibration import load_calibration
from rotary_gguf.cli import main
from rotary_gguf.demo import SHIPPED_MODEL
from rotary_gguf.gguf import open_index
from rotary_gguf.profile import load_profile
from rotary_gguf.runtime import Engine, EngineOptions
from rotary_gguf.simulate import simulate
from rotary_gguf.trace import read_trace

PROFILE = load_profile("rtx4060-laptop-8gb")
# Marks of Python source: indentation, docstrings, keywords, calls.
PYTHON_MARKS = ('"""', "\n    ", "def ", "return", "if ", "for ", "self", "import", " = ", "(", ":", "#")


def test_shipped_model_is_a_calibrated_qwen3moe_with_its_licence():
    index = open_index(SHIPPED_MODEL)
    assert index.params.arch == "qwen3moe" and index.params.n_expert == 32 and index.params.n_expert_used == 4
    assert SHIPPED_MODEL.stat().st_size <= 40 * 10**6
    cal, source = load_calibration(index)
    assert source == "rotary.* metadata" and cal.generated_tokens > 0
    notes = SHIPPED_MODEL.parent
    assert "Python Software Foundation" in (notes / "PSF-LICENSE.txt").read_text()
    assert "PSF-LICENSE.txt" in (notes / "README.txt").read_text()


def test_demo_completes_code_readably():
    result = CliRunner().invoke(main, ["demo", "--tokens", "40"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"shipped {SHIPPED_MODEL}")
    completion = result.stdout.split("def fibonacci(n):\n", 1)[1].rsplit("\n" + "-" * 60, 1)[0]
    assert len(completion) > 40 and completion.isascii()
    assert sum(mark in completion for mark in PYTHON_MARKS) >= 2, completion
    words = completion.split()
    assert sum(w.strip('.,:()"\'').isalpha() for w in words) >= 0.6 * len(words), completion  # words, not noise


def test_perplexity_on_stdlib_code(tmp_path):
    """Far below what a model that knows nothing scores (uniform over 8,192 tokens: perplexity 8,192;
    random weights: more)."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "heapq.py").read_text()
    (tmp_path / "code.py").write_text(text)
    out = CliRunner().invoke(main, ["perplexity", str(SHIPPED_MODEL), str(tmp_path / "code.py"), "--ctx", "256",
                                    "--profile", "cpu-only", "--threads", "2", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["scored_tokens"] > 1000 and result["ppl"] < 200


def test_routing_is_skewed_unlike_a_random_model(tmp_path):
    """Real routing concentrates: each layer's busiest quarter of experts takes well over a quarter of the
    selections (a random router spreads them near evenly; see test_calibrate's random-model counts)."""
    cal, _ = load_calibration(open_index(SHIPPED_MODEL))
    layers = cal.routing()
    assert len(layers) == 6
    assert np.mean([r.top_quarter_share for r in layers]) > 0.45
    assert all(r.entropy_bits < r.uniform_bits - 0.2 for r in layers)


def test_simulator_reproduces_the_plugin_on_real_routing(stand_in, tmp_path, slot_budget):
    """The plugin's hit rate on the shipped model's own routing equals the simulator's on its trace."""
    budget = 2 * open_index(SHIPPED_MODEL).slot_bytes(0)
    options = EngineOptions(ctx=512, threads=2, vram_budget=slot_budget(SHIPPED_MODEL, 4, 512), policy="hybrid",
                            copy_budget=budget, trace=tmp_path / "run.rtrc")
    prompts = ["def merge_sorted(a, b):\n", "class Stack:\n    def __init__(self):\n"]
    with Engine.open(SHIPPED_MODEL, "rtx4060-laptop-8gb", "rotary", options) as model:
        plugin_hits = 0
        for prompt in prompts:
            model.complete(prompt, 48, ignore_eos=True)
            plugin_hits += sum(s.device_pairs for s in model.rotation.layer_stats())
    trace = read_trace(tmp_path / "run.rtrc")
    assert trace.decode_steps == 96
    prior = load_calibration(open_index(SHIPPED_MODEL))[0].popularity()  # hybrid's prior at run time
    result = simulate(trace, 4, "hybrid", PROFILE, budget_bytes=budget, prior=prior, prefetch=True)
    assert plugin_hits / (96 * 4 * 6) == result.hit_rate
    # The plugin's cross-layer predictions name most of the next layer's experts (a random guess: 4 of 32).
    assert result.prediction_recall > 0.6 and result.prefetches_per_token > 0
    shown = CliRunner().invoke(main, ["simulate", str(tmp_path / "run.rtrc"), "--slots", "4", "--policy", "hybrid",
                                      "--budget", f"{budget}B", "--calibration", str(SHIPPED_MODEL), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["hit_rate"] == round(result.hit_rate, 4)
    # Real routing repeats: four slots of 32 serve far more than the 4/32 a uniform router would give.
    assert result.hit_rate > 0.25


@pytest.mark.parametrize("fraction", [8, 4, 2])
def test_rotation_on_the_recorded_trace_beats_static_slots(fraction):
    trace = read_trace(Path(__file__).resolve().parent.parent / "benchmarks" / "traces" / "stdlib-moe.rtrc")
    slots = trace.header.n_expert // fraction
    result = simulate(trace, slots, "hybrid", PROFILE)
    assert result.hit_rate > result.static_hit_rate


def test_simulate_refuses_a_model_without_calibration(tmp_path, tiny_model):
    trace = Path(__file__).resolve().parent.parent / "benchmarks" / "traces" / "stdlib-moe.rtrc"
    out = CliRunner().invoke(main, ["simulate", str(trace), "--slots", "4", "--calibration", str(tiny_model)])
    assert out.exit_code == 2 and "no calibration to seed from" in out.stderr and out.stderr.count("\n") == 1

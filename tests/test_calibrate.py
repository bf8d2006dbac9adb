"""Routing calibration: sidecar counts, rotary-aware GGUF that stock llama.cpp loads, stale sidecars, the
calibration prior at load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rotary_gguf.calibration import Calibration, load_calibration, read_sidecar, routing_summary
from rotary_gguf.cli import main
from rotary_gguf.gguf import open_index
from rotary_gguf.trace import read_trace

N_USED, N_LAYER = 2, 2


@pytest.fixture(scope="module")
def calibrated(wide_arch_models, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of a wide qwen3moe model, calibrated (sidecar and trace), and its rotary-aware GGUF."""
    folder = tmp_path_factory.mktemp("calibrated")
    model = Path(shutil.copy(wide_arch_models[("qwen3moe", "q8_0")], folder / "model.gguf"))
    runner = CliRunner()
    out = runner.invoke(main, ["calibrate", str(model), "--profile", "cpu-only", "--threads", "2", "--tokens", "8",
                               "--trace", str(folder / "cal.rtrc"), "--plot", str(folder / "heat.png")])
    assert out.exit_code == 0, out.output
    embedded = runner.invoke(main, ["calibrate", str(model), "--profile", "cpu-only", "--threads", "2",
                                    "--tokens", "8", "--embed", "-o", str(folder / "rotary.gguf")])
    assert embedded.exit_code == 0, embedded.output
    return model, folder / "rotary.gguf"


def test_sidecar_counts_every_routed_token(calibrated):
    model, _ = calibrated
    cal = read_sidecar(model.with_name("model.gguf.rotary.json"), open_index(model))
    assert cal.prompts == 6 and cal.generated_tokens == 6 * 8
    assert sum(cal.prompt_counts[0]) == cal.prompt_tokens * N_USED
    assert sum(cal.generated_counts[0]) == sum(cal.generated_counts[N_LAYER - 1]) == cal.generated_tokens * N_USED
    # llama.cpp routes only the token that needs logits through the last layer of a prompt batch
    assert sum(cal.prompt_counts[N_LAYER - 1]) == cal.prompts * N_USED
    trace = read_trace(model.with_name("cal.rtrc"))
    assert trace.decode_steps == 6 * 8 and not trace.header.synthetic
    assert model.with_name("heat.png").read_bytes()[:4] == b"\x89PNG"


def test_rotary_gguf_loads_in_stock_llama_cpp_unchanged(calibrated, stock_engine, prompt_ids):
    model, rotary = calibrated
    index = open_index(rotary)
    assert index.metadata["rotary.format_version"] == 1 and index.metadata["general.alignment"] == 4096
    assert all(t.offset % 4096 == 0 for t in index.tensors)
    logits = []
    for path in (model, rotary):
        engine = stock_engine(path, ctx=256, threads=2)
        engine.complete(prompt_ids, 0)
        logits.append(engine.logits())
    assert np.array_equal(*logits)
    cal, source = load_calibration(index)
    assert source == "rotary.* metadata" and sum(cal.generated_counts[0]) == cal.generated_tokens * N_USED
    shown = CliRunner().invoke(main, ["inspect", str(rotary)])
    assert "calibration    from rotary.* metadata: built-in mixed set" in shown.output


def test_stale_sidecar_is_detected(calibrated, wide_arch_models, tmp_path):
    model, _ = calibrated
    other = Path(shutil.copy(wide_arch_models[("qwen3moe", "q4_k_m")], tmp_path / "other.gguf"))
    shutil.copy(model.with_name("model.gguf.rotary.json"), tmp_path / "other.gguf.rotary.json")
    cal, reason = load_calibration(open_index(other))
    assert cal is None and "stale calibration" in reason
    shown = CliRunner().invoke(main, ["inspect", str(other), "--json"])
    assert "stale calibration" in json.loads(shown.stdout)["calibration"]["reason"]


def test_calibration_seeds_slots_at_load(stand_in, calibrated, open_engine, slot_budget):
    model, _ = calibrated
    engine = open_engine(model, "rtx4060-laptop-8gb", "rotary", ctx=256, threads=2, vram_budget=slot_budget(model, 3))
    popularity = load_calibration(open_index(model))[0].popularity()
    for layer, resident in engine.rotation.rotator.expert_in.items():
        assert len(resident) == 3
        top = sorted(popularity[layer], reverse=True)[:3]
        assert sorted((popularity[layer][e] for e in resident), reverse=True) == top
    assert engine.rotation.rotator.policy.name == "hybrid"


@pytest.mark.parametrize("args, message", [
    (["--embed"], "--embed and -o OUT.gguf go together"),
    (["--prompts", "/nonexistent.txt"], "cannot read prompts"),
])
def test_calibrate_errors_are_one_line(calibrated, args, message):
    model, _ = calibrated
    out = CliRunner().invoke(main, ["calibrate", str(model), "--profile", "cpu-only", *args])
    assert out.exit_code == 2 and message in out.stderr and out.stderr.count("\n") == 1


def test_plan_predicts_reads_from_calibration(calibrated, slot_budget):
    model, _ = calibrated
    budget = slot_budget(model, 3)
    out = CliRunner().invoke(main, ["plan", str(model), "--profile", "rtx4060-laptop-8gb", "--placement", "rotary",
                                    "--vram-budget", f"{budget}B", "--ctx", "256", "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.stdout)
    cal = load_calibration(open_index(model))[0]
    slots = plan["expert_slots"]["0"]
    assert plan["calibrated"] and 0 < slots < 8
    shares = [sorted(p, reverse=True)[:slots] for p in cal.popularity().values()]
    assert plan["predicted_device_read_share"] == round(float(np.mean([sum(s) for s in shares])), 4)


def test_routing_statistics_of_known_counts():
    # Layer 0: all selections on one of 16 experts; layer 1: uniform over 16.
    skewed, uniform = (80,) + (0,) * 15, (5,) * 16
    cal = Calibration("m.gguf", 1, "", "hand-made", 1, 80, 80, {0: skewed, 1: uniform}, {0: skewed, 1: uniform})
    first, second = cal.routing()
    assert (first.layer, first.entropy_bits, first.uniform_bits) == (0, 0.0, 4.0)
    assert first.top_eighth_share == first.top_quarter_share == 1.0
    assert second.entropy_bits == pytest.approx(4.0)
    assert (second.top_eighth_share, second.top_quarter_share) == (0.125, 0.25)
    assert routing_summary([first, second]) == ("routing entropy 2.00 (0.00-4.00) bits of 4.00 for uniform; the top "
                                                "1/8 of experts take 56% (12%-100%), the top 1/4 62% (25%-100%) of "
                                                "selections (mean over 2 layers, range)")

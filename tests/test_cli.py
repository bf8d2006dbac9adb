"""The `rotary` commands, run through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rotary_gguf.cli import main
from rotary_gguf.gguf import open_index


def test_inspect_table(tiny_model):
    result = CliRunner().invoke(main, ["inspect", str(tiny_model)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "qwen3moe: 2 layers (2 with routed experts), 8 experts, 2 used per token" in out
    assert "routed experts" in out and "384.00 KiB" in out
    assert "one expert     gate 8.00 KiB  up 8.00 KiB  down 8.00 KiB  = 24.00 KiB" in out
    assert "must be VRAM" in out and "can be host" in out


def test_inspect_json_matches_index(tiny_model):
    result = CliRunner().invoke(main, ["inspect", "--json", str(tiny_model)])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    index = open_index(tiny_model)
    assert data["arch"] == "qwen3moe" and data["n_expert"] == 8 and data["n_expert_used"] == 2
    assert data["bytes_by_class"] == index.bytes_by_class
    assert len(data["experts"]) == len(index.experts) == 2 * 8 * 3
    first = data["experts"][0]
    assert first == {"file": 0, "layer": 0, "expert": 0, "proj": "gate", "part": "weight",
                     "offset": index.experts[0].offset, "nbytes": 64 * 32 * 4, "type": "F32"}


def test_synth_command(tmp_path):
    out = tmp_path / "m.gguf"
    runner = CliRunner()
    result = runner.invoke(main, ["synth", str(out), "--preset", "tiny", "--type", "q8_0", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and open_index(out).params.n_expert == 8
    again = runner.invoke(main, ["synth", str(out)])
    assert again.exit_code == 2 and "exists; pass --force" in again.stderr
    forced = runner.invoke(main, ["synth", str(out), "--force", "--type", "f16"])
    assert forced.exit_code == 0
    assert {t.type.name for t in open_index(out).tensors} == {"F16", "F32"}


def test_synth_hf_command(tmp_path):
    result = CliRunner().invoke(main, ["synth-hf", str(tmp_path / "hf"), "--model-type", "mixtral"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"


def test_demo_synthesizes_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("ROTARY_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    first = runner.invoke(main, ["demo", "--synthetic", "tiny", "--tokens", "5"])
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("synthesized ") and "tok/s" in first.stdout
    assert "qwen3moe: 2 layers" in first.stdout
    second = runner.invoke(main, ["demo", "--synthetic", "tiny", "--tokens", "5"])
    assert second.stdout.startswith("cached ")
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("inspect", "synth", "synth-hf", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("arch", ["qwen2moe", "llama", "olmoe", "gpt-oss"])
def test_synth_other_architectures_run(tmp_path, stock_engine, arch):
    out = tmp_path / f"{arch}.gguf"
    result = CliRunner().invoke(main, ["synth", str(out), "--arch", arch, "--type", "q8_0"])
    assert result.exit_code == 0, result.output
    assert open_index(out).params.arch == arch
    assert stock_engine(out, ctx=512).complete("<|im_start|>user\nhi<|im_end|>\n", 4).prompt_tokens > 0

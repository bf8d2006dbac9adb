"""The runtime on the real llama.cpp build: overrides take effect, the commands run, errors are clean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from rotary_gguf import runtime
from rotary_gguf.cli import main
from rotary_gguf.gguf import open_index
from rotary_gguf.plan import plan_placement
from rotary_gguf.profile import load_profile


def _overridden(model: runtime.LoadedModel) -> set[str]:
    """Tensor names llama.cpp's loader says it moved because of an override."""
    return {line.split()[1] for line in model.log_lines if "buffer type overridden to" in line}


def test_overrides_take_effect(wide_models):
    """Planned expert tensors land in the CPU mapped buffer; without a placement llama.cpp repacks them."""
    path = wide_models["q4_k"]
    index = open_index(path)
    placement = plan_placement(index, load_profile("cpu-only"))
    planned = runtime.load(path, placement)
    expert_names = {t.name for t in index.tensors if t.cls.value == "routed_expert"}
    assert _overridden(planned) == expert_names
    assert {b.name for b in planned.buffers if b.kind == "model"} == {"CPU_Mapped"}
    stock = runtime.load(path)
    assert "CPU_REPACK" in {b.name for b in stock.buffers if b.kind == "model"}
    assert not _overridden(stock)
    repacked = runtime.load(path, placement, repack=True)
    assert "CPU_REPACK" in {b.name for b in repacked.buffers if b.kind == "model"}
    prompt = "<|im_start|>user\nsame answer?<|im_end|>\n"
    assert runtime.generate(planned.llm, prompt, 8).tokens == runtime.generate(stock.llm, prompt, 8).tokens


def test_layer_fill_overrides_only_cpu_layers(arch_models):
    """On a GPU profile, only the experts of layers left on the host are overridden (here: layer 1)."""
    from dataclasses import replace

    path = arch_models["qwen3moe"]
    index = open_index(path)
    laptop = replace(load_profile("rtx4060-laptop-8gb"), gpu_overhead_bytes=0)
    fixed = plan_placement(index, laptop, vram_budget=4 * 2**30, strategy="experts-on-host").predicted_vram_bytes
    placement = plan_placement(index, laptop, vram_budget=fixed + index.bytes_by_layer[0]["routed_expert"])
    assert placement.gpu_expert_layers == (0,)
    model = runtime.load(path, placement)
    assert _overridden(model) == {f"blk.1.ffn_{p}_exps.weight" for p in ("gate", "up", "down")}


def test_plan_json_fields(real_shapes_header):
    result = CliRunner().invoke(main, ["plan", str(real_shapes_header), "--profile", "rtx4060-laptop-8gb", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("profile", "vram_budget_bytes", "predicted_vram_bytes", "predicted_host_bytes", "gpu_expert_layers",
                "overrides"):
        assert key in data
    assert data["predicted_vram_bytes"] <= data["vram_budget_bytes"]
    assert data["overrides"][0]["buffer"] == "CPU" and data["overrides"][0]["pattern"].startswith("^blk")


def test_plan_table(real_shapes_header):
    result = CliRunner().invoke(main, ["plan", str(real_shapes_header), "--profile", "rtx4060-laptop-8gb",
                                       "--vram-budget", "6GiB", "--ctx", "8192"])
    assert result.exit_code == 0
    assert "of 6.00 GiB" in result.stdout and "ctx 8192" in result.stdout and "-> CPU" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--profile", "rtx4060-laptop-8gb", "--vram-budget", "9GiB"], "more than the GPU's 8.00 GiB"),
    (["--profile", "rtx4060-laptop-8gb", "--vram-budget", "six"], "--vram-budget: expected a size"),
    (["--profile", "rtx4060-laptop-8gb", "--ctx", "99999"], "beyond the model's training context (40960)"),
    (["--profile", "rtx3050-laptop-4gb", "--ctx", "40960"], "try --ctx"),
])
def test_plan_errors_are_one_line(real_shapes_header, args, message):
    result = CliRunner().invoke(main, ["plan", str(real_shapes_header), *args])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_run_streams_and_reports(tiny_model):
    result = CliRunner().invoke(main, ["run", str(tiny_model), "Hello", "-n", "6", "--temp", "0", "--chat",
                                       "--profile", "cpu-only"])
    assert result.exit_code == 0, result.output
    assert "prompt tokens at" in result.stderr and "generated at" in result.stderr


def test_run_missing_and_malformed_model(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["run", str(tmp_path / "none.gguf"), "hi"])
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    malformed = runner.invoke(main, ["chat", str(bad)])
    assert malformed.exit_code == 2 and str(bad) in malformed.stderr and malformed.stderr.count("\n") == 1


def _dense_copy(moe: Path, out: Path) -> Path:
    """The llama-arch MoE model rewritten as a dense llama: same attention, a plain FFN per layer."""
    reader = GGUFReader(moe)
    writer = GGUFWriter(out, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or "expert" in key:
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        if "_exps" not in t.name and "ffn_gate_inp" not in t.name:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    n_layer = int(reader.fields["llama.block_count"].contents())
    for i in range(n_layer):
        for name, shape in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32))):
            writer.add_tensor(f"blk.{i}.ffn_{name}.weight", rng.standard_normal(shape, dtype=np.float32) * 0.1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_dense_model_runs_and_says_so(arch_models, tmp_path):
    dense = _dense_copy(arch_models["llama"], tmp_path / "dense.gguf")
    assert not open_index(dense).is_moe
    result = CliRunner().invoke(main, ["run", str(dense), "Hello", "-n", "4", "--profile", "cpu-only"])
    assert result.exit_code == 0, result.output
    assert "dense model" in result.stderr


def test_bench_json(tiny_model):
    result = CliRunner().invoke(main, ["bench", str(tiny_model), "--profile", "cpu-only", "--prompt-tokens", "32",
                                       "--tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["profile"] == "cpu-only" and data["vram_budget_bytes"] == 0 and data["model"] == str(tiny_model)
    names = [p["name"] for p in data["placements"]]
    assert names == ["layer-fill", "experts-on-host"]
    for p in data["placements"]:
        assert p["decode_tokens"] == 8 and p["prompt_tokens"] == 32
        assert p["decode_tok_s"] > 0 and p["prompt_tok_s"] > 0 and p["peak_rss_bytes"] > 0
        assert p["peak_vram_bytes"] is None  # no GPU here
    one = CliRunner().invoke(main, ["bench", str(tiny_model), "--profile", "cpu-only", "--prompt-tokens", "16",
                                    "--tokens", "4", "--placement", "experts-on-host", "--json"])
    assert [p["name"] for p in json.loads(one.stdout)["placements"]] == ["experts-on-host"]


def test_dry_run_sizes_compute_like_a_real_load(small_model):
    """llama.cpp's no_alloc dry run reports the compute buffer a real load then allocates."""
    profile = load_profile("cpu-only")
    placement = plan_placement(open_index(small_model), profile, ctx=1024)
    options = runtime.context_options(placement, profile)
    dry = runtime.dry_run(small_model, placement, **options)
    real = runtime.load(small_model, placement, **options)
    assert [b.nbytes for b in dry if b.kind == "compute"] == [b.nbytes for b in real.buffers if b.kind == "compute"]
    assert placement.host_compute_bytes >= real.buffer_bytes(kind="compute")
    result = CliRunner().invoke(main, ["plan", str(small_model), "--profile", "cpu-only", "--ctx", "1024",
                                       "--check", "--json"])
    compute = [b["bytes"] for b in json.loads(result.stdout)["dry_run_buffers"] if b["kind"] == "compute"]
    assert compute == [real.buffer_bytes(kind="compute")]
    table = CliRunner().invoke(main, ["plan", str(small_model), "--profile", "cpu-only", "--check"])
    assert "dry run" in table.stdout and "CPU compute  planned" in table.stdout


def test_prompt_longer_than_context_is_one_line(tiny_model):
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(tiny_model), "word " * 600, "--ctx", "256", "--profile", "cpu-only"])
    assert result.exit_code == 2 and "the context holds 256" in result.stderr and result.stderr.count("\n") == 1
    bench = runner.invoke(main, ["bench", str(tiny_model), "--ctx", "256", "--prompt-tokens", "300",
                                 "--profile", "cpu-only"])
    assert bench.exit_code == 2 and "do not fit ctx 256" in bench.stderr and bench.stderr.count("\n") == 1


def test_profile_context_is_capped_by_the_model(arch_models):
    """A profile's default context longer than the model's training context is not an error."""
    from dataclasses import replace

    index = open_index(arch_models["qwen3moe"])
    long_profile = replace(load_profile("cpu-only"), ctx=32768)
    assert plan_placement(index, long_profile).ctx == index.params.n_ctx_train

"""The runtime on the real llama.cpp build: overrides take effect, the commands run, errors are clean."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from rotary_gguf.cli import main
from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import open_index
from rotary_gguf.plan import STRATEGIES, plan_placement
from rotary_gguf.profile import load_profile
from rotary_gguf.runtime import Engine, EngineOptions, dry_run, prepare, rotary_unavailable
from rotary_gguf.runtime.llama import captured_log, parse_buffers
from rotary_gguf.telemetry import sample_telemetry

PROMPT = "<|im_start|>user\nsame answer?<|im_end|>\n"


def _overridden_lines(lines) -> set[str]:
    """Tensor names llama.cpp's loader says it moved because of an override."""
    return {line.split()[1] for line in lines if "buffer type overridden to" in line}


def _overridden(engine: Engine) -> set[str]:
    return _overridden_lines(engine.log_lines)


def _plain_load(path: Path, options: EngineOptions, ids: list[int], n_tokens: int):
    """llama.cpp by itself, no rotary in between: its load log's buffers and overrides, and greedy tokens."""
    with captured_log() as lines:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=options.ctx, n_threads=options.threads, n_batch=options.batch,
                              n_ubatch=options.ubatch, flash_attn=options.flash_attention, verbose=False)
    try:
        tokens = []
        llm.eval(ids)
        for _ in range(n_tokens):
            token = int(np.argmax(llama_cpp.llama_get_logits_ith(llm.ctx, -1)[:llm.n_vocab()]))
            if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token):
                break
            tokens.append(token)
            llm.eval([token])
        return parse_buffers(lines), _overridden_lines(lines), tuple(tokens)
    finally:
        llm.close()


def _model_buffers(buffers) -> set[tuple[str, int]]:
    return {(b.name, b.nbytes) for b in buffers if b.kind == "model"}


def test_overrides_take_effect(wide_models, open_engine, stock_engine):
    """Planned expert tensors land in the CPU mapped buffer; llama.cpp by itself repacks them, and so does
    the stock engine (repack=True), with the same buffers and the same tokens as a plain load."""
    path = wide_models["q4_k"]
    index = open_index(path)
    planned = open_engine(path, placement="layer-fill", ctx=512)
    expert_names = {t.name for t in index.tensors if t.cls.value == "routed_expert"}
    assert _overridden(planned) == expert_names
    assert {b.name for b in planned.buffers if b.kind == "model"} == {"CPU_Mapped"}
    stock = stock_engine(path, ctx=512)
    assert "CPU_REPACK" in {b.name for b in stock.buffers if b.kind == "model"}
    ids = stock.tokenize(PROMPT)
    plain_buffers, plain_overridden, plain_tokens = _plain_load(path, stock.options, ids, 8)
    assert "CPU_REPACK" in {b.name for b in plain_buffers if b.kind == "model"} and not plain_overridden
    assert _model_buffers(stock.buffers) == _model_buffers(plain_buffers)
    assert planned.complete(PROMPT, 8).tokens == stock.complete(PROMPT, 8).tokens == plain_tokens


def test_layer_fill_overrides_only_cpu_layers(arch_models, open_engine):
    """On a GPU profile, only the experts of layers left on the host are overridden (here: layer 1)."""
    path = arch_models["qwen3moe"]
    index = open_index(path)
    laptop = replace(load_profile("rtx4060-laptop-8gb"), gpu_overhead_bytes=0)
    fixed = plan_placement(index, laptop, vram_budget=4 * 2**30, strategy="experts-on-host").predicted_vram_bytes
    engine = open_engine(path, laptop, "layer-fill", vram_budget=fixed + index.bytes_by_layer[0]["routed_expert"])
    assert engine.placement.gpu_expert_layers == (0,)
    assert _overridden(engine) == {f"blk.1.ffn_{p}_exps.weight" for p in ("gate", "up", "down")}


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


def test_chat_answers_and_exits(tiny_model):
    result = CliRunner().invoke(main, ["chat", str(tiny_model), "-n", "6", "--temp", "0", "--profile", "cpu-only",
                                       "--ctx", "512"], input="Hello\n/reset\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "chatting with tiny-f32.gguf (ctx 512)" in result.stderr
    assert "[conversation cleared]" in result.stdout


def test_run_missing_and_malformed_model(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["run", str(tmp_path / "none.gguf"), "hi"])
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    malformed = runner.invoke(main, ["chat", str(bad)])
    assert malformed.exit_code == 2 and str(bad) in malformed.stderr and malformed.stderr.count("\n") == 1


@pytest.mark.parametrize("command", [["run", "{model}", "Hello"], ["chat", "{model}"]])
def test_run_and_chat_pass_rotation_flags_to_the_engine(tiny_model, monkeypatch, command):
    """--policy and --copy-budget reach the engine's options (what rotation does with them is tested with
    the plugin); bad values are one line and exit 2."""
    seen = {}

    def fake_open(cls, model, profile, placement, options):
        seen.update(model=model, profile=profile, placement=placement, options=options)
        raise RotaryError("stopped before loading")

    args = [a.format(model=tiny_model) for a in command] + ["--profile", "cpu-only", "--placement", "rotary"]
    with monkeypatch.context() as patch:
        patch.setattr(Engine, "open", classmethod(fake_open))
        result = CliRunner().invoke(main, [*args, "--policy", "lfu", "--copy-budget", "64MiB"])
    assert result.exit_code == 2 and "stopped before loading" in result.stderr
    assert (seen["model"], seen["profile"], seen["placement"]) == (tiny_model, "cpu-only", "rotary")
    assert seen["options"].policy == "lfu" and seen["options"].copy_budget == 64 * 2**20
    bad_policy = CliRunner().invoke(main, [*args, "--policy", "fifo"])
    assert bad_policy.exit_code == 2 and "'fifo' is not one of 'lru', 'lfu', 'hybrid'" in bad_policy.stderr
    bad_budget = CliRunner().invoke(main, [*args, "--copy-budget", "lots"])
    assert bad_budget.exit_code == 2 and bad_budget.stderr.count("\n") == 1
    assert "--copy-budget: expected a size" in bad_budget.stderr


def test_rotation_flags_are_accepted_without_rotary(tiny_model):
    result = CliRunner().invoke(main, ["run", str(tiny_model), "Hello", "-n", "2", "--profile", "cpu-only",
                                       "--placement", "experts-on-host", "--policy", "lru", "--copy-budget", "1MiB"])
    assert result.exit_code == 0, result.output
    assert "generated at" in result.stderr


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
    assert names == [s for s in STRATEGIES if s != "rotary" or rotary_unavailable() is None]
    has_vram = sample_telemetry().vram_total_bytes is not None  # NVML sees a GPU on this machine
    assert data["repetitions"] == 3
    for p in data["placements"]:
        assert p["decode_tokens"] == 8 and p["prompt_tokens"] == 32 and p["repetitions"] == len(p["runs"]) == 3
        assert p["decode_tok_s"]["mean"] > 0 and p["prompt_tok_s"]["mean"] > 0 and p["peak_rss_bytes"] > 0
        assert all(r["decode_tok_s"] > 0 and r["prompt_tok_s"] > 0 for r in p["runs"])
        assert (p["peak_vram_bytes"] is not None) == has_vram
    one = CliRunner().invoke(main, ["bench", str(tiny_model), "--profile", "cpu-only", "--prompt-tokens", "16",
                                    "--tokens", "4", "--placement", "experts-on-host", "--json"])
    assert [p["name"] for p in json.loads(one.stdout)["placements"]] == ["experts-on-host"]


def test_dry_run_sizes_compute_like_a_real_load(small_model):
    """llama.cpp's no_alloc dry run reports the compute buffer a real load then allocates."""
    setup = prepare(small_model, "cpu-only", "layer-fill", EngineOptions(ctx=1024))
    dry = dry_run(small_model, setup.placement, setup.options)
    with Engine.from_setup(setup) as real:
        compute = [b.nbytes for b in real.buffers if b.kind == "compute"]
        assert [b.nbytes for b in dry if b.kind == "compute"] == compute
        assert setup.placement.host_compute_bytes >= real.buffer_bytes(host=True, kind="compute")
    result = CliRunner().invoke(main, ["plan", str(small_model), "--profile", "cpu-only", "--ctx", "1024",
                                       "--check", "--json"])
    assert [b["bytes"] for b in json.loads(result.stdout)["dry_run_buffers"] if b["kind"] == "compute"] == compute
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
    index = open_index(arch_models["qwen3moe"])
    long_profile = replace(load_profile("cpu-only"), ctx=32768)
    assert plan_placement(index, long_profile).ctx == index.params.n_ctx_train

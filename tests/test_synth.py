"""Synthetic models: valid GGUFs that the real llama.cpp loads and runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

from rotary_gguf.errors import SynthError
from rotary_gguf.gguf import open_index
from rotary_gguf.synth import PRESETS, synth_model
from rotary_gguf.synth.layout import tensor_specs
from rotary_gguf.synth.spec import ModelSpec
from rotary_gguf.synth.weights import random_tensor

PROMPT = "<|im_start|>user\nHello, experts.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.F16])
def test_quantized_weights_have_asked_spread(qtype):
    data = random_tensor(np.random.default_rng(0), (512, 256), qtype, 0.05)
    values = dequantize(data, qtype) if qtype is not T.F16 else data.astype(np.float32)
    assert values.shape == (256, 512)
    assert abs(values.mean()) < 0.006
    assert 0.045 < values.std() < 0.055


def test_tiny_preset_is_small_and_deterministic(tmp_path):
    a = synth_model(tmp_path / "a.gguf", PRESETS["tiny"], "f32", seed=7)
    b = synth_model(tmp_path / "b.gguf", PRESETS["tiny"], "f32", seed=7)
    c = synth_model(tmp_path / "c.gguf", PRESETS["tiny"], "f32", seed=8)
    assert a.nbytes < 2_000_000
    assert a.path.read_bytes() == b.path.read_bytes() != c.path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]


def test_k_quant_falls_back_on_short_rows(tmp_path):
    index = open_index(synth_model(tmp_path / "t.gguf", PRESETS["tiny"], "q4_k").path)
    types = {t.name: t.type for t in index.tensors}
    assert types["blk.0.ffn_up_exps.weight"] is T.Q8_0  # 64-wide rows cannot hold 256-element blocks
    assert types["blk.0.ffn_gate_inp.weight"] is T.F32 and types["blk.0.attn_norm.weight"] is T.F32


def test_real_shapes_preset_as_sparse_file(tmp_path):
    """The qwen3-30b-a3b preset's header (data left as a hole) indexes with the real model's numbers."""
    result = synth_model(tmp_path / "q30.gguf", PRESETS["qwen3-30b-a3b"], "q4_k", sparse=True)
    index = open_index(result.path)
    p = index.params
    assert (p.n_layer, p.n_expert, p.n_expert_used, p.n_embd, p.n_ff_exp, p.n_vocab) == (48, 128, 8, 2048, 768, 151936)
    assert len(index.experts) == 48 * 128 * 3
    assert 15e9 < index.bytes_by_class["routed_expert"] < 18e9
    assert index.max_expert_bytes == 3 * 2048 * 768 // 256 * 144
    assert result.path.stat().st_blocks * 512 < 50e6  # really sparse


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from rotary_gguf.synth import writer

    def explode(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(writer, "_write_data", explode)
    with pytest.raises(OSError):
        synth_model(tmp_path / "x.gguf", PRESETS["tiny"], "f32")
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: shutil_module._ntuple_diskusage(10, 10, 10))
    with pytest.raises(SynthError, match="GiB free"):
        synth_model(tmp_path / "x.gguf", PRESETS["small"], "q4_k")
    assert list(tmp_path.iterdir()) == []


def test_spec_validation():
    with pytest.raises(SynthError, match="n_expert_used"):
        ModelSpec("qwen3moe", 1, 64, 4, 2, 16, n_expert=4, n_expert_used=5, n_ff_exp=32)
    with pytest.raises(SynthError, match="unknown synth architecture"):
        ModelSpec("gpt2", 1, 64, 4, 2, 16, n_expert=4, n_expert_used=2, n_ff_exp=32)
    names = [t.name for t in tensor_specs(replace(PRESETS["tiny"], n_vocab=1024))]
    assert len(names) == len(set(names))


def test_tiny_model_generates_tokens_in_llama_cpp(tiny_model, stock_engine):
    engine = stock_engine(tiny_model, ctx=512)
    first = engine.complete(PROMPT, 12)
    again = engine.complete(PROMPT, 12)
    assert first.prompt_tokens > 5
    assert len(first.tokens) >= 1
    assert first.tokens == again.tokens  # greedy decoding is deterministic
    assert all(0 <= t < 1024 for t in first.tokens)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "llama", "olmoe", "gpt-oss"])
def test_every_architecture_runs_in_llama_cpp(arch_models, stock_engine, arch):
    _generates_sane_logits(stock_engine(arch_models[arch], ctx=512))


def _generates_sane_logits(engine) -> None:
    generation = engine.complete(PROMPT, 6)
    assert len(generation.tokens) >= 1 or generation.stopped_at_eos
    logits = engine.logits()
    assert np.isfinite(logits).all() and logits.std() > 0


def test_quantized_model_logits_are_sane(wide_models, stock_engine):
    """Random K-quant weights give finite, non-degenerate logits (a well-conditioned random model)."""
    engine = stock_engine(wide_models["q4_k"], ctx=512)
    engine.complete(PROMPT, 0)
    logits = engine.logits()
    assert np.isfinite(logits).all()
    assert 0.1 < logits.std() < 100


def test_padded_vocabulary_loads_and_tokenizes_like_hf_tokenizers(models_dir, stock_engine):
    """The embedded BPE passes llama.cpp's tokenizer loading (also padded to a real model's size),
    and llama.cpp splits text exactly as HF tokenizers does with the same vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")
    import llama_cpp

    from rotary_gguf.synth.hf import write_hf_checkpoint

    path = synth_model(models_dir / "pad.gguf", replace(PRESETS["tiny"], n_vocab=2000), "f32").path
    engine = stock_engine(path, ctx=512)
    engine.complete(PROMPT, 0)
    assert engine.logits().shape == (2000,)
    # The engine's detokenize leaves control tokens out; llama.cpp's own vocabulary renders them.
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    hf_dir = models_dir / "hf-tok"
    write_hf_checkpoint(hf_dir, "qwen3_moe")
    hf = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    try:
        for text in ["def main(argv):\n    return 0\n", "The Licensee may copy it. 12345 ÄÖ 東京", PROMPT]:
            ours = engine.tokenize(text)
            assert ours == hf.encode(text).ids, text
            assert vocab.detokenize(ours, special=True).decode() == text
            assert engine.detokenize(ours) == hf.decode(ours, skip_special_tokens=True)
    finally:
        vocab.close()


def test_real_shapes_run_in_llama_cpp(tmp_path, stock_engine):
    """One layer of the qwen3-30b-a3b preset (real per-layer shapes and 151,936-token vocabulary, Q4_K)
    loads and decodes in llama.cpp, so the full 48-layer file is a valid benchmark model."""
    spec = replace(PRESETS["qwen3-30b-a3b"], n_layer=1)
    path = synth_model(tmp_path / "q30-1layer.gguf", spec, "q4_k").path
    index = open_index(path)
    assert index.max_expert_bytes == 3 * 2048 * 768 // 256 * 144
    engine = stock_engine(path, ctx=256)
    generation = engine.complete(PROMPT, 4)
    assert len(generation.tokens) >= 1 or generation.stopped_at_eos
    logits = engine.logits()
    assert logits.shape == (151936,) and np.isfinite(logits).all()


# The hybrid presets and the family fixture (tests/conftest.py) that llama.cpp's converter made from the same shapes.
HYBRID_FAMILIES = {"qwen35moe-tiny": "qwen3_5_moe_text", "gemma4-tiny": "gemma4_text"}
REAL_SHAPES = ("qwen3.6-35b-a3b", "gemma4-26b-a4b")
MiB = 2**20


@pytest.fixture(scope="module")
def hybrid_models(models_dir) -> dict[str, Path]:
    return {name: synth_model(models_dir / f"{name}.gguf", PRESETS[name], "f32", seed=4).path
            for name in HYBRID_FAMILIES}


@pytest.fixture(scope="module")
def real_shape_headers(models_dir) -> dict[str, Path]:
    """The real-shape hybrid presets as sparse files (a few MB on disk each)."""
    return {name: synth_model(models_dir / f"{name}-sparse.gguf", PRESETS[name], "q4_k", sparse=True).path
            for name in REAL_SHAPES}


@pytest.mark.parametrize("preset", HYBRID_FAMILIES)
def test_hybrid_tiny_presets_generate_in_llama_cpp(hybrid_models, stock_engine, preset):
    _generates_sane_logits(stock_engine(hybrid_models[preset], ctx=512))


@pytest.mark.parametrize("preset", HYBRID_FAMILIES)
def test_hybrid_experts_are_indexed(hybrid_models, preset):
    """Fused gate_up and down blocks per expert (and gemma4's per-expert down scale); the MTP block holds no slots."""
    spec = PRESETS[preset]
    index = open_index(hybrid_models[preset])
    blocks = {(b.proj, b.part) for b in index.experts}
    scale = {("down", "scale")} if spec.arch == "gemma4" else set()
    assert blocks == {("gate_up", "weight"), ("down", "weight")} | scale
    assert index.moe_layers == tuple(range(spec.n_layer))
    assert index.nextn_layers == tuple(range(spec.n_layer, spec.n_layer + spec.n_nextn))
    assert index.params.n_expert == spec.n_expert and index.params.n_ff_exp == spec.n_ff_exp


def _layout(path: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Tensor name -> ggml shape, gate and up experts fused as gate_up; the architecture's metadata keys."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    for gate in [n for n in shapes if n.endswith("ffn_gate_exps.weight")]:
        e, f, x = shapes.pop(gate)
        shapes.pop(gate.replace("gate_exps", "up_exps"))
        shapes[gate.replace("gate_exps", "gate_up_exps")] = (e, 2 * f, x)
    arch = str(reader.fields["general.architecture"].contents())
    return shapes, {k for k in reader.fields if k.startswith(arch + ".")}


@pytest.mark.parametrize("preset", HYBRID_FAMILIES)
def test_hybrid_layout_is_the_converters(hybrid_models, family_models, preset):
    """Tensor names, shapes and metadata keys of the tiny preset are what llama.cpp's convert_hf_to_gguf.py
    writes for the same shapes, but for the differences the presets mean: the converter ran with --no-mtp
    (the preset has one MTP block), and gemma4's full-attention layers reuse K as V (the 26B-A4B's
    attention_k_eq_v; the fixture has v projections) and its softcap is the 26B-A4B's."""
    ours, our_keys = _layout(hybrid_models[preset])
    theirs, their_keys = _layout(family_models(HYBRID_FAMILIES[preset]))
    spec = PRESETS[preset]
    mtp = [n for n in ours if n.startswith(f"blk.{spec.n_layer}.")]
    assert bool(mtp) == (spec.n_nextn > 0)
    full_v = {f"blk.{i}.attn_v.weight" for i in range(spec.n_layer) if (i + 1) % spec.full_attention_interval == 0}
    expected = {n: s for n, s in theirs.items() if not (spec.arch == "gemma4" and n in full_v)}
    assert {n: s for n, s in ours.items() if n not in mtp} == expected
    extra = {"qwen35moe.nextn_predict_layers"} if spec.arch == "qwen35moe" else {"gemma4.final_logit_softcapping"}
    assert our_keys == their_keys | extra


def test_real_shape_presets_are_sparse_and_fast(real_shape_headers):
    """The vocabulary padded to 248,320 / 262,144 tokens is written in well under a second or two."""
    for name, path in real_shape_headers.items():
        index = open_index(path)
        assert index.params.n_vocab == PRESETS[name].n_vocab
        assert path.stat().st_blocks * 512 < 50e6
    q36 = open_index(real_shape_headers["qwen3.6-35b-a3b"])
    assert q36.nextn_layers == (40,) and q36.moe_layers == tuple(range(40))
    assert 17e9 < q36.bytes_by_class["routed_expert"] < 20e9


@pytest.mark.parametrize("ctx, kv_mib", [(4096, 80), (32768, 640)])
def test_qwen36_memory_is_the_issues(real_shape_headers, ctx, kv_mib):
    """rtx4060-laptop-8gb with an f16 KV cache: 10 attention layers x 2 KV heads x 256 x 2 per token, and
    30 Gated DeltaNet layers' state (62.8 MiB); the MTP block gets no expert slots."""
    from rotary_gguf.plan import plan_placement
    from rotary_gguf.profile import load_profile

    index = open_index(real_shape_headers["qwen3.6-35b-a3b"])
    profile = load_profile("rtx4060-laptop-8gb")
    assert profile.kv_cache_type == "f16"
    plan = plan_placement(index, profile, strategy="layer-fill", ctx=ctx)
    assert plan.kv_bytes == kv_mib * MiB
    assert round(plan.state_bytes / MiB, 1) == 62.8
    rotary = plan_placement(index, profile, strategy="rotary", ctx=ctx)
    assert [layer for layer, _ in rotary.expert_slots] == list(range(40))


@pytest.mark.parametrize("preset", REAL_SHAPES)
def test_real_shape_presets_inspect_and_plan_under_every_profile(real_shape_headers, preset):
    from click.testing import CliRunner

    from rotary_gguf.cli import main
    from rotary_gguf.profile import profile_names

    path = str(real_shape_headers[preset])
    runner = CliRunner()
    assert runner.invoke(main, ["inspect", path]).exit_code == 0
    for profile in profile_names():
        result = runner.invoke(main, ["plan", path, "--profile", profile])
        assert result.exit_code == 0, (profile, result.output)
        assert "total" in result.output


@pytest.mark.parametrize("preset", REAL_SHAPES)
def test_llama_cpp_accepts_the_real_shape_headers(real_shape_headers, preset):
    """llama.cpp's dry run (no_alloc) loads the sparse file and builds a context: names, shapes and keys pass."""
    from click.testing import CliRunner

    from rotary_gguf.cli import main

    result = CliRunner().invoke(main, ["plan", str(real_shape_headers[preset]), "--profile", "rtx4060-laptop-8gb",
                                       "--ctx", "4096", "--check"])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "compute buffers" in result.output


def test_synth_cli_sparse_and_layout_errors(tmp_path):
    from click.testing import CliRunner

    from rotary_gguf.cli import main

    runner = CliRunner()
    out = tmp_path / "q36.gguf"
    result = runner.invoke(main, ["synth", str(out), "--preset", "qwen3.6-35b-a3b", "--sparse"])
    assert result.exit_code == 0, result.output
    assert "qwen35moe, Q4_K, header only" in result.output
    assert out.stat().st_blocks * 512 < 50e6 < out.stat().st_size
    for args in (["--arch", "qwen35moe"], ["--preset", "gemma4-tiny", "--arch", "llama"]):
        bad = runner.invoke(main, ["synth", str(tmp_path / "x.gguf"), *args])
        assert bad.exit_code == 2 and "from their own presets" in bad.output
        assert len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()

"""Synthetic models: valid GGUFs that the real llama.cpp loads and runs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

from rotary_gguf.errors import SynthError
from rotary_gguf.gguf import open_index
from rotary_gguf.synth import PRESETS, synth_model
from rotary_gguf.synth.spec import ModelSpec, tensor_specs
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
    engine = stock_engine(arch_models[arch], ctx=512)
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

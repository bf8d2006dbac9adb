"""`rotary convert` against the real references: transformers' logits for the same checkpoint, and
llama.cpp's own convert_hf_to_gguf.py tensor for tensor; bad checkpoints get one line and no output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from rotary_gguf.cli import main
from rotary_gguf.convert import convert
from rotary_gguf.gguf import open_index
from rotary_gguf.synth.hf import write_hf_checkpoint

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")
IDS = list(range(10, 42))
REFERENCE = Path(__file__).resolve().parents[1] / "scripts" / "reference_convert.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """bf16 checkpoints of every family. gpt-oss's YaRN is set to truncate=true, the variant llama.cpp
    implements (with the released truncate=false the converter warns: test_gpt_oss_untruncated_yarn_warns)."""
    folder = tmp_path_factory.mktemp("hf")
    found = {t: write_hf_checkpoint(folder / t, t, dtype="bf16", seed=1)[0].parent for t in FAMILIES}
    config = json.loads((found["gpt_oss"] / "config.json").read_text())
    config["rope_scaling"]["truncate"] = True
    (found["gpt_oss"] / "config.json").write_text(json.dumps(config))
    return found


@pytest.fixture(scope="module")
def reference_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with conversion/ and gguf-py/) from the pinned llama-cpp-python sdist."""
    from rotary_gguf.plugin_build import llama_cpp_converter

    return llama_cpp_converter()


def _llama_logits(stock_engine, path: Path) -> np.ndarray:
    """Last-token logits of IDS in a stock llama.cpp load (f32 KV cache, no flash attention)."""
    with stock_engine(path, ctx=256, threads=2, kv_cache_type="f32", flash_attention=False, batch=512) as engine:
        engine.complete(IDS, 0)
        return engine.logits()


def _transformers_logits(folder: Path) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0, -1].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_match_transformers(checkpoints, stock_engine, tmp_path, family):
    out = convert(checkpoints[family], tmp_path / "model.gguf", "f32")
    assert np.abs(_llama_logits(stock_engine, out) - _transformers_logits(checkpoints[family])).max() <= 1e-4


def test_transformers_5_config_and_shards(stock_engine, tmp_path):
    folder = write_hf_checkpoint(tmp_path / "hf", "qwen3_moe", dtype="bf16", config_style="v5", shards=3)[0].parent
    assert (folder / "model.safetensors.index.json").exists()
    out = convert(folder, tmp_path / "model.gguf", "f32")
    assert np.abs(_llama_logits(stock_engine, out) - _transformers_logits(folder)).max() <= 1e-4


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_equal_llama_cpp_converter(checkpoints, reference_converter, tmp_path, family, qtype):
    ref = tmp_path / "reference.gguf"
    subprocess.run([sys.executable, str(REFERENCE), str(reference_converter), str(checkpoints[family]),
                    "--outtype", qtype, "--outfile", str(ref)], check=True, capture_output=True)
    ours = convert(checkpoints[family], tmp_path / "ours.gguf", qtype)
    theirs = {t.name: t for t in GGUFReader(ref).tensors}
    mine = {t.name: t for t in GGUFReader(ours).tensors}
    assert set(mine) == set(theirs)
    for name, t in theirs.items():
        assert (mine[name].tensor_type, list(mine[name].shape)) == (t.tensor_type, list(t.shape)), name
        assert np.array_equal(np.asarray(mine[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name


def test_k_quant_through_llama_cpp_and_calibrated_output(checkpoints, stock_engine, tmp_path):
    out = tmp_path / "q4.gguf"
    result = CliRunner().invoke(main, ["convert", str(checkpoints["qwen3_moe"]), "-o", str(out), "--type", "q4_k_m",
                                       "--calibrate", "builtin"])
    assert result.exit_code == 0, result.output
    index = open_index(out)
    assert {"Q4_K", "Q8_0", "Q6_K", "Q5_K"} & set(index.type_counts) and index.metadata["rotary.format_version"] == 1
    assert all(t.offset % 4096 == 0 for t in index.tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4.gguf"]
    engine = stock_engine(out, ctx=256, threads=2)
    engine.complete(IDS, 0)
    assert np.isfinite(engine.logits()).all()


def _broken(tmp_path: Path, how: str) -> Path:
    folder = write_hf_checkpoint(tmp_path / "hf", "qwen3_moe", dtype="bf16", shards=2)[0].parent
    config = json.loads((folder / "config.json").read_text())
    if how == "no config":
        (folder / "config.json").unlink()
    elif how == "corrupt config":
        (folder / "config.json").write_text("{not json")
    elif how == "missing shard":
        next(folder.glob("model-00002-*.safetensors")).unlink()
    elif how in ("dense", "unknown"):
        config["model_type"] = "qwen3" if how == "dense" else "deepseek_v3"
        (folder / "config.json").write_text(json.dumps(config))
    elif how in ("shape", "count"):
        config["moe_intermediate_size" if how == "shape" else "num_experts"] = 48 if how == "shape" else 6
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "dtype":
        shard = next(folder.glob("model-00001-*.safetensors"))
        shard.write_bytes(shard.read_bytes().replace(b'"dtype":"BF16"', b'"dtype":"I8"  ', 1))
    return folder


@pytest.mark.parametrize("how, message", [
    ("no config", "no config.json"), ("corrupt config", "unreadable config"), ("missing shard", "missing shard"),
    ("dense", "is a dense model"), ("unknown", "unsupported model_type 'deepseek_v3'; supported: qwen3_moe"),
    ("shape", "down_proj experts have shapes [(64, 32)]; config.json implies 48 x 64"),
    ("count", "8 of 6 down_proj experts"), ("dtype", "has dtype I8"),
])
def test_bad_checkpoints_are_one_line_and_write_nothing(tmp_path, how, message):
    folder = _broken(tmp_path, how)
    out = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "out.gguf")])
    assert out.exit_code == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not list(tmp_path.glob("out.gguf*"))


def test_existing_output_needs_force(checkpoints, tmp_path):
    (tmp_path / "out.gguf").write_bytes(b"keep")
    out = CliRunner().invoke(main, ["convert", str(checkpoints["olmoe"]), "-o", str(tmp_path / "out.gguf")])
    assert out.exit_code == 2 and "use --force" in out.stderr and (tmp_path / "out.gguf").read_bytes() == b"keep"


def test_unknown_pre_tokenizer_warns_and_converts(checkpoints, tmp_path, caplog):
    import shutil

    folder = Path(shutil.copytree(checkpoints["qwen2_moe"], tmp_path / "hf"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "_"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = convert(folder, tmp_path / "out.gguf", "q8_0")
    assert "unrecognised pre-tokenizer" in caplog.text
    assert open_index(out).metadata["tokenizer.ggml.pre"] == "default"


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "bf16"])
def test_pieces_convert_like_the_whole(checkpoints, tmp_path, monkeypatch, qtype):
    """Row blocks and experts converted apart on threads give the bytes of one whole-tensor conversion."""
    import rotary_gguf.convert as converter

    whole = convert(checkpoints["qwen2_moe"], tmp_path / "whole.gguf", qtype)
    monkeypatch.setattr(converter, "_ROWS_PER_CHUNK", 7)  # the embedding and output head split in 147 blocks
    pieces = convert(checkpoints["qwen2_moe"], tmp_path / "pieces.gguf", qtype)
    assert whole.read_bytes() == pieces.read_bytes()


def test_gpt_oss_untruncated_yarn_warns(tmp_path, caplog):
    folder = write_hf_checkpoint(tmp_path / "hf", "gpt_oss", dtype="bf16")[0].parent
    convert(folder, tmp_path / "out.gguf", "q8_0")
    assert "truncate=false: llama.cpp always rounds the correction range" in caplog.text
    assert open_index(tmp_path / "out.gguf").metadata["gpt-oss.rope.scaling.type"] == "yarn"


def test_sentencepiece_style_tokenizer_is_refused(checkpoints, tmp_path):
    """Mixtral's released tokenizer.json is SentencePiece's BPE (byte_fallback): written as a byte-level
    "gpt2" vocabulary it would tokenize wrongly, so it is one clear error and nothing is written."""
    import shutil

    folder = Path(shutil.copytree(checkpoints["mixtral"], tmp_path / "mixtral"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out)])
    assert result.exit_code == 2 and "SentencePiece-style tokenizer" in result.stderr
    assert result.stderr.count("\n") == 1 and not list(tmp_path.glob("out.gguf*"))

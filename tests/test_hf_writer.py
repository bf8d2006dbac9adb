"""Tiny HF checkpoints: readable by the safetensors and tokenizers libraries, both config styles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rotary_gguf.errors import SynthError
from rotary_gguf.synth.hf import TINY, write_hf_checkpoint

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _read_header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_f32_checkpoint_reads_back(tmp_path, model_type):
    write_hf_checkpoint(tmp_path, model_type, dtype="f32")
    tensors = safetensors_numpy.load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model_type
    assert tensors["model.embed_tokens.weight"].shape == (config["vocab_size"], TINY["hidden"])
    expert = "block_sparse_moe.experts.3.w2" if model_type == "mixtral" else "mlp.experts.3.down_proj"
    assert tensors[f"model.layers.1.{expert}.weight"].shape == (TINY["hidden"], TINY["ff"])
    n_experts = config.get("num_experts") or config["num_local_experts"]
    assert n_experts == TINY["experts"]
    if model_type == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate.weight" in tensors
        assert "model.layers.0.self_attn.q_proj.bias" in tensors


def test_bf16_is_rounded_f32(tmp_path):
    write_hf_checkpoint(tmp_path / "f32", dtype="f32", seed=4)
    write_hf_checkpoint(tmp_path / "bf16", dtype="bf16", seed=4)
    reference = safetensors_numpy.load_file(tmp_path / "f32" / "model.safetensors")
    header, data = _read_header(tmp_path / "bf16" / "model.safetensors")
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    start, end = header[name]["data_offsets"]
    assert header[name]["dtype"] == "BF16"
    bf16 = (np.frombuffer(data[start:end], "<u2").astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(bf16.reshape(reference[name].shape), reference[name], rtol=2**-8)


def test_config_styles(tmp_path):
    write_hf_checkpoint(tmp_path / "v4", config_style="v4")
    write_hf_checkpoint(tmp_path / "v5", config_style="v5")
    v4 = json.loads((tmp_path / "v4" / "config.json").read_text())
    v5 = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert v4["num_experts"] == 8 and v4["rope_theta"] == 1e6 and v4["torch_dtype"] == "bfloat16"
    assert v5["num_local_experts"] == 8 and v5["rope_parameters"]["rope_theta"] == 1e6 and v5["dtype"] == "bfloat16"
    assert "num_experts" not in v5 and "rope_theta" not in v5


def test_sharded_checkpoint_index_covers_every_tensor(tmp_path):
    files = write_hf_checkpoint(tmp_path, "qwen3_moe", shards=3, dtype="f32")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted({f.name for f in files if f.suffix == ".safetensors"})
    assert shards == sorted(set(index["weight_map"].values())) and len(shards) == 3
    seen = {}
    for shard in shards:
        seen.update(safetensors_numpy.load_file(tmp_path / shard))
    assert set(seen) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in seen.values())


def test_tokenizer_files_load(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    write_hf_checkpoint(tmp_path)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]


def test_unknown_model_type(tmp_path):
    with pytest.raises(SynthError, match="known: qwen3_moe"):
        write_hf_checkpoint(tmp_path, "deepseek_v3")

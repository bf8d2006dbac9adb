"""Tiny random HF-format MoE checkpoints (config.json, safetensors, tokenizer) for converter tests.

Written as real checkpoints are: bf16 by default, transformers-4.x or 5.x config keys, optionally
sharded with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rotary_gguf.errors import SynthError
from rotary_gguf.synth.vocab import CHAT_TEMPLATE, QWEN2_SPLIT, embedded_vocabulary

# The shapes every tiny checkpoint shares (small enough for a unit test, large enough for GQA and top-k).
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=8, top_k=2, ff=32, shared_ff=48)
_ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}
# gpt-oss's RoPE: YaRN stretched 32x from 4096 positions, as the released checkpoints configure it.
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
_DTYPES = {"f32": ("F32", "float32"), "f16": ("F16", "float16"), "bf16": ("BF16", "bfloat16")}


def _kv_heads(model_type: str, t: dict[str, int]) -> int:
    """OLMoE checkpoints use full multi-head attention (and llama.cpp's OLMoE needs it); the others GQA."""
    return t["heads"] if model_type == "olmoe" else t["kv_heads"]


def _config(model_type: str, dtype: str, style: str, vocab: int, t: dict[str, int]) -> dict:
    vocab_ids = embedded_vocabulary()
    cfg = {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "hidden_size": t["hidden"], "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
        "num_key_value_heads": _kv_heads(model_type, t), "head_dim": t["head_dim"], "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "num_experts_per_tok": t["top_k"], "hidden_act": "silu",
        "bos_token_id": vocab_ids.id_of("<|endoftext|>"), "eos_token_id": vocab_ids.id_of("<|im_end|>"),
    }
    experts_key = "num_local_experts" if model_type in ("mixtral", "gpt_oss") or style == "v5" else "num_experts"
    cfg[experts_key] = t["experts"]
    if model_type in ("qwen3_moe", "qwen2_moe"):
        cfg.update(moe_intermediate_size=t["ff"], intermediate_size=t["ff"] * t["top_k"],
                   norm_topk_prob=model_type == "qwen3_moe", decoder_sparse_step=1)
    else:
        cfg["intermediate_size"] = t["ff"]
    if model_type == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = t["shared_ff"]
    rope = {"rope_type": "default"}
    if model_type == "gpt_oss":
        rope = dict(_GPT_OSS_ROPE)
        cfg.update(sliding_window=128, swiglu_limit=7.0, attention_bias=True, rms_norm_eps=1e-5,
                   layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(t["layers"])])
    if style == "v5":
        cfg.update(rope_parameters={**rope, "rope_theta": 1_000_000.0}, dtype=_DTYPES[dtype][1])
    else:
        cfg.update(rope_theta=1_000_000.0, torch_dtype=_DTYPES[dtype][1])
        if rope["rope_type"] != "default":
            cfg["rope_scaling"] = rope
    return cfg


def _tensors(model_type: str, vocab: int, rng: np.random.Generator,
             t: dict[str, int]) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensor names and float32 values, [out_features, in_features] as torch stores them."""
    e, hd, q, f = t["hidden"], t["head_dim"], t["heads"] * t["head_dim"], t["ff"]
    kv = _kv_heads(model_type, t) * t["head_dim"]

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])

    yield "model.embed_tokens.weight", rng.standard_normal((vocab, e), dtype=np.float32)
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", np.ones(e, np.float32)
        yield p + "post_attention_layernorm.weight", np.ones(e, np.float32)
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            yield p + f"self_attn.{name}_proj.weight", w(rows, e)
            if model_type in ("qwen2_moe", "gpt_oss"):
                yield p + f"self_attn.{name}_proj.bias", w(rows) * 0.1
        yield p + "self_attn.o_proj.weight", w(e, q)
        if model_type == "qwen3_moe":
            yield p + "self_attn.q_norm.weight", np.ones(hd, np.float32)
            yield p + "self_attn.k_norm.weight", np.ones(hd, np.float32)
        if model_type == "olmoe":
            yield p + "self_attn.q_norm.weight", np.ones(q, np.float32)
            yield p + "self_attn.k_norm.weight", np.ones(kv, np.float32)
        if model_type == "gpt_oss":
            yield from _gpt_oss_layer(p, t, w, q, kv)
            continue
        moe = p + ("block_sparse_moe." if model_type == "mixtral" else "mlp.")
        yield moe + "gate.weight", w(t["experts"], e)
        for j in range(t["experts"]):
            x = f"{moe}experts.{j}."
            names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            yield x + f"{names[0]}.weight", w(f, e)
            yield x + f"{names[1]}.weight", w(f, e)
            yield x + f"{names[2]}.weight", w(e, f)
        if model_type == "qwen2_moe":
            s = t["shared_ff"]
            yield moe + "shared_expert.gate_proj.weight", w(s, e)
            yield moe + "shared_expert.up_proj.weight", w(s, e)
            yield moe + "shared_expert.down_proj.weight", w(e, s)
            yield moe + "shared_expert_gate.weight", w(1, e)
    yield "model.norm.weight", np.ones(e, np.float32)
    yield "lm_head.weight", w(vocab, e)


def _gpt_oss_layer(p: str, t: dict[str, int], w, q: int, kv: int) -> Iterator[tuple[str, np.ndarray]]:
    """gpt-oss after attention: output bias, attention sinks, a biased router, and experts stored fused
    ([experts, hidden, 2 x ff] with gate and up interleaved) with biases."""
    e, f, n = t["hidden"], t["ff"], t["experts"]
    yield p + "self_attn.o_proj.bias", w(e) * 0.1
    yield p + "self_attn.sinks", w(t["heads"])
    yield p + "mlp.router.weight", w(n, e)
    yield p + "mlp.router.bias", w(n) * 0.1
    yield p + "mlp.experts.gate_up_proj", w(n, 2 * f, e).transpose(0, 2, 1).copy()
    yield p + "mlp.experts.gate_up_proj_bias", w(n, 2 * f) * 0.1
    yield p + "mlp.experts.down_proj", w(n, e, f).transpose(0, 2, 1).copy()
    yield p + "mlp.experts.down_proj_bias", w(n, e) * 0.1


def _encode(value: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":
        # bf16 is the top half of f32 (round to nearest even), as torch stores it.
        bits = value.astype(np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype("<u2").tobytes()
    return value.astype("<f4" if dtype == "f32" else "<f2").tobytes()


def write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]], dtype: str) -> None:
    """The safetensors format: u64 header length, JSON header of offsets, then the raw data."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name, value in tensors:
        data = _encode(value, dtype)
        header[name] = {"dtype": _DTYPES[dtype][0], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for chunk in chunks:
            f.write(chunk)


def _tokenizer_files(out: Path) -> list[Path]:
    vocab = embedded_vocabulary()
    added = [{"id": vocab.id_of(tok), "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for tok in vocab.special_tokens]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {tok: i for i, tok in enumerate(vocab.tokens)},
                  "merges": list(vocab.merges)},
    }
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return [out / "tokenizer.json", out / "tokenizer_config.json"]


def write_hf_checkpoint(out: str | Path, model_type: str = "qwen3_moe", *, dtype: str = "bf16",
                        config_style: str = "v4", shards: int = 1, seed: int = 0,
                        shapes: dict[str, int] | None = None) -> list[Path]:
    """Write a tiny random checkpoint of `model_type` into `out`; returns the files written. `shapes`
    overrides TINY's entries (hidden, layers, heads, kv_heads, head_dim, experts, top_k, ff, shared_ff),
    e.g. for a checkpoint of a gigabyte or more for conversion benchmarks."""
    if model_type not in _ARCHITECTURES:
        raise SynthError(f"no tiny HF writer for model_type {model_type!r}; known: {', '.join(_ARCHITECTURES)}")
    if dtype not in _DTYPES or config_style not in ("v4", "v5") or shards < 1:
        raise SynthError(f"bad checkpoint options: dtype={dtype!r} config_style={config_style!r} shards={shards}")
    unknown = set(shapes or {}) - set(TINY)
    if unknown:
        raise SynthError(f"unknown checkpoint shape keys: {', '.join(sorted(unknown))}; known: {', '.join(TINY)}")
    t = {**TINY, **(shapes or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = len(embedded_vocabulary().tokens)
    tensors = list(_tensors(model_type, vocab, np.random.default_rng(seed), t))
    (out / "config.json").write_text(json.dumps(_config(model_type, dtype, config_style, vocab, t), indent=2))
    files = [out / "config.json", *_tokenizer_files(out)]
    if shards == 1:
        write_safetensors(out / "model.safetensors", tensors, dtype)
        return files + [out / "model.safetensors"]
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = tensors[k::shards]
        write_safetensors(out / name, part, dtype)
        weight_map.update({tensor: name for tensor, _ in part})
        files.append(out / name)
    index = {"metadata": {"total_size": sum(v.size * (4 if dtype == "f32" else 2) for _, v in tensors)},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files + [out / "model.safetensors.index.json"]

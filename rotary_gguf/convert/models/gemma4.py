"""Gemma 4 MoE text model (Gemma 4 26B-A4B; llama.cpp gemma4): every layer has a dense GELU MLP and a routed
MoE block side by side (fused [experts, 2 x ff, hidden] gate_up experts, a router with its own input scale
and a per-expert output scale), sliding-window and full-attention layers with their own head sizes and RoPE
bases, "proportional" partial RoPE on the full layers (written as rope_freqs, as convert_hf_to_gguf.py does),
a scalar per layer. Norm weights are used as stored (no + 1, unlike Gemma 3). The multimodal release
(gemma4, Gemma4ForConditionalGeneration) is read for its text model only; its SentencePiece-style tokenizer
becomes llama.cpp's gemma4 vocabulary (add_vocab)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from rotary_gguf.convert.checkpoint import ConvertError, HFConfig, StoredTensor, read_tensor

ARCH = gguf.MODEL_ARCH.GEMMA4
EXPERT = r"(?!)"  # experts are stored fused: derive() passes them through expert by expert
STACKED = ""
PROJECTIONS = ()
# Tokens convert_hf_to_gguf.py always marks USER_DEFINED (rendered, so that chat parsers can read them).
_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
            '<|"|>'}
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_VISION = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.", "vision.", "audio.")
_OWN = {"router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale"}
_OWN_NAME = re.compile(r"model\.layers\.(\d+)\.(router\.scale|router\.per_expert_scale)")


def validate(cfg: HFConfig) -> None:
    if not cfg.get("enable_moe_block"):
        raise ConvertError(f"{cfg.model_type} without enable_moe_block is a dense model; rotary converts "
                           "Mixture-of-Experts checkpoints (Gemma 4 26B-A4B)")


def rename(name: str, cfg: HFConfig) -> str | None:
    """convert_hf_to_gguf.py's names: language-model prefix dropped, '.weight' on the layer scalar; None for
    the vision and audio towers."""
    if any(part in name for part in _VISION):
        return None
    name = name.replace("language_model.", "")
    return name + ".weight" if name.endswith(("per_dim_scale", "layer_scalar")) else name


def gguf_name(name: str) -> str | None:
    """The router's input scale and the per-expert output scale, which gguf-py's table does not name."""
    if (m := _OWN_NAME.fullmatch(name)) is None:
        return None
    return f"blk.{m.group(1)}.{_OWN[m.group(2)]}"


def derive(name: str, t: StoredTensor, cfg: HFConfig) -> list[tuple[str, tuple[int, ...], Callable]] | None:
    """Fused experts ([experts, 2 x ff, hidden] gate_up_proj, [experts, hidden, ff] down_proj) kept fused,
    converted one expert at a time."""
    base, _, kind = name.rpartition(".experts.")
    if not base or kind not in ("gate_up_proj", "down_proj") or (known := rename(base, cfg)) is None:
        return None
    if len(t.shape) != 3 or t.shape[0] != cfg.n_expert:
        raise ConvertError(f"{name}: shape {list(t.shape)} is not [{cfg.n_expert} experts, rows, columns]")
    return [(f"{known}.experts.{kind}.weight", t.shape,
             lambda e: np.ascontiguousarray(read_tensor(t, slice(e, e + 1))[0]))]


def _layer_types(cfg: HFConfig) -> list[str]:
    layer_types, n_layer = cfg.require("layer_types"), int(cfg.require("num_hidden_layers"))
    if len(layer_types) != n_layer:
        raise ConvertError(f"layer_types has {len(layer_types)} entries; num_hidden_layers is {n_layer}")
    return layer_types


def _full_layer(cfg: HFConfig, key: str, fallback: str) -> int | None:
    """A full-attention layer's value: the global_* key, else per_layer_config of the first full layer."""
    if (value := cfg.get(fallback)) is not None:
        return int(value)
    per_layer = cfg.get("per_layer_config", default={}) or {}
    for layer, values in sorted(per_layer.items(), key=lambda kv: int(kv[0])):
        if _layer_types(cfg)[int(layer)] == "full_attention" and key in values:
            return int(values[key])
    return None


def parameters(cfg: HFConfig, writer: gguf.GGUFWriter) -> None:
    swa = [t == "sliding_attention" for t in _layer_types(cfg)]
    head_dim_swa, head_dim_full = cfg.head_dim, _full_layer(cfg, "head_dim", "global_head_dim")
    if head_dim_full is None:
        raise ConvertError("config.json gives no head size for the full-attention layers (global_head_dim)")
    rope = cfg.get("rope_parameters", default={}) or {}
    if (swa_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(float(swa_theta))
    if softcap := cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(softcap))
    if cfg.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(int(cfg.require("sliding_window")))
    writer.add_shared_kv_layers(int(cfg.get("num_kv_shared_layers", default=0)))
    writer.add_embedding_length_per_layer_input(int(cfg.get("hidden_size_per_layer_input", default=0) or 0))
    writer.add_sliding_window_pattern(swa)
    writer.add_key_length(head_dim_full)
    writer.add_value_length(head_dim_full)
    writer.add_key_length_swa(head_dim_swa)
    writer.add_value_length_swa(head_dim_swa)
    writer.add_expert_feed_forward_length(int(cfg.require("expert_intermediate_size", "moe_intermediate_size")))
    if cfg.get("use_double_wide_mlp"):
        raise ConvertError("gemma4 with use_double_wide_mlp (KV-shared layers): not a MoE model rotary converts")
    if (kv_full := _full_layer(cfg, "num_key_value_heads", "num_global_key_value_heads")) is not None:
        kv_swa = int(cfg.require("num_key_value_heads"))
        writer.kv_data[0].pop(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=writer.arch), None)  # per layer now
        writer.add_head_count_kv([kv_swa if is_swa else kv_full for is_swa in swa])
    writer.add_rope_dimension_count(head_dim_full)
    # convert_hf_to_gguf.py reads the factor at the top of rope_parameters (none there: all dimensions)
    writer.add_rope_dimension_count_swa(int(head_dim_swa * rope.get("partial_rotary_factor", 1.0)))


def generate(cfg: HFConfig) -> list[tuple[str, np.ndarray]]:
    """rope_freqs for the full layers' proportional RoPE: factor 1 on the rotated pairs, 1e30 (no rotation)
    on the rest, since ggml's NeoX RoPE rotates the leading dimensions only."""
    full = (cfg.get("rope_parameters", default={}) or {}).get("full_attention", {})
    if full.get("rope_type") != "proportional":
        raise ConvertError(f"gemma4 full-attention RoPE {full.get('rope_type')!r}; llama.cpp's gemma4 expects "
                           "'proportional'")
    head_dim_full = int(_full_layer(cfg, "head_dim", "global_head_dim") or 0)
    n_rot = int(head_dim_full * float(full.get("partial_rotary_factor", 1.0)) / 2)
    values = np.array([1.0] * n_rot + [1e30] * (head_dim_full // 2 - n_rot), dtype=np.float32)
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", values)]


@lru_cache(maxsize=4)
def _tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{folder}: no tokenizer.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: unreadable tokenizer: {exc}") from None


def reshape(name: str, shape: tuple[int, ...], cfg: HFConfig) -> tuple[int, ...]:
    """The embedding without rows past the tokenizer (vocabulary + added tokens), as convert_hf_to_gguf.py
    trims it."""
    if not name.endswith("embed_tokens.weight") or cfg.folder is None:
        return shape
    data = _tokenizer_json(cfg.folder)
    return (min(shape[0], len(data["model"]["vocab"]) + len(data.get("added_tokens", []))), *shape[1:])


def _special_texts(folder: Path) -> set[str]:
    """transformers' all_special_tokens: the named ones and the extra ones of tokenizer_config.json (or
    special_tokens_map.json)."""
    texts: set[str] = set()
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if not (folder / file).is_file():
            continue
        config = json.loads((folder / file).read_text(encoding="utf-8"))
        values = [config.get(key) for key in _NAMED_SPECIALS]
        values += config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        texts |= {v["content"] if isinstance(v, dict) else v for v in values if v}
    return texts


def add_vocab(writer: gguf.GGUFWriter, folder: Path) -> bool:
    """A SentencePiece-style BPE tokenizer.json (byte_fallback, the release's) as llama.cpp's gemma4
    vocabulary, as convert_hf_to_gguf.py writes it through gguf-py's LlamaHfVocab: every token by id, scores
    -1000, byte tokens BYTE, special tokens CONTROL, the chat-channel tokens USER_DEFINED, BOS added, no space
    prefix. False (the generic byte-level path) for any other tokenizer."""
    data = _tokenizer_json(folder)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    base = {int(i): text for text, i in model["vocab"].items()}
    if sorted(base) != list(range(len(base))):
        raise ConvertError(f"{folder / 'tokenizer.json'}: vocabulary ids are not 0..{len(base) - 1}")
    added = {int(t["id"]): t["content"] for t in data.get("added_tokens", [])}
    by_id = {**base, **added}
    ids = {text: i for i, text in by_id.items()}
    special_ids = {ids[text] for text in _special_texts(folder) if text in ids}
    tokens, types = [], []
    for i in sorted(i for i in by_id if i < len(base) or i in added):
        text = by_id[i]
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE
        elif i in special_ids:
            kind = gguf.TokenType.CONTROL
        else:
            kind = gguf.TokenType.NORMAL if i < len(base) else gguf.TokenType.USER_DEFINED
        tokens.append(text)
        types.append(gguf.TokenType.USER_DEFINED if text in _VISIBLE else kind)
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0] * len(tokens))
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True)
    special.add_special_token["bos"] = True
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)
    return True

"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 MoE (llama.cpp glm4moe): leading dense layers, sigmoid routing with a
score-correction bias over routed experts, shared experts, optional q/k norms, RoPE on part of each head
(NeoX order, so no q/k permutation). The release's MTP layers (model.layers.N, N >= num_hidden_layers) are
kept as llama.cpp's NextN blocks, as convert_hf_to_gguf.py does by default."""

from __future__ import annotations

import gguf

from rotary_gguf.convert.checkpoint import HFConfig, StoredTensor

ARCH = gguf.MODEL_ARCH.GLM4_MOE
EXPERT = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
STACKED = "model.layers.{layer}.mlp.experts.{proj}.weight"
PROJECTIONS = ("down_proj", "gate_proj", "up_proj")
# convert_hf_to_gguf.py's GLM vocabulary: the llama-bpe split under llama.cpp's "glm4" name (no BOS by default,
# merges ignored as for llama-bpe) and its special tokens (with <|endoftext|> as EOT, generation never ends).
PRE_TOKENIZER_NAMES = {"llama-bpe": "glm4"}
SPECIAL_TOKENS = {"bos": "[gMASK]", "eot": "<|user|>", "unk": "<|endoftext|>", "eom": "<|observation|>"}


def extra_blocks(cfg: HFConfig, tensors: dict[str, StoredTensor]) -> int:
    """The NextN (MTP) layers the config declares and the checkpoint holds."""
    n_layer, n_mtp = int(cfg.require("num_hidden_layers")), int(cfg.get("num_nextn_predict_layers", default=0))
    return n_mtp if any(name.startswith(f"model.layers.{n_layer}.") for name in tensors) else 0


def rename(name: str, cfg: HFConfig) -> str:
    return name.replace("e_score_correction_bias", "e_score_correction.bias")


def parameters(cfg: HFConfig, writer: gguf.GGUFWriter) -> None:
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    rope = cfg.get("rope_parameters", "rope_scaling", default={}) or {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default=0.5))
    writer.add_rope_dimension_count(int(cfg.head_dim * factor))
    writer.add_expert_feed_forward_length(int(cfg.require("moe_intermediate_size")))
    if (n_group := cfg.get("n_group")) is not None:
        writer.add_expert_group_count(int(n_group))
    if (n_group_used := cfg.get("topk_group")) is not None:
        writer.add_expert_group_used_count(int(n_group_used))
    if (n_shared := cfg.get("n_shared_experts")) is not None:
        writer.add_expert_shared_count(int(n_shared))
    if (n_dense := cfg.get("first_k_dense_replace")) is not None:
        writer.add_leading_dense_block_count(int(n_dense))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if (scale := cfg.get("routed_scaling_factor")) is not None:
        writer.add_expert_weights_scale(float(scale))
    if (norm := cfg.get("norm_topk_prob")) is not None:
        writer.add_expert_weights_norm(bool(norm))


def block_parameters(cfg: HFConfig, writer: gguf.GGUFWriter, n_block: int) -> None:
    if cfg.get("num_nextn_predict_layers") is not None:
        writer.add_nextn_predict_layers(n_block - int(cfg.require("num_hidden_layers")))

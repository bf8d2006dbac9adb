"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3.6-35B-A3B): per-head q/k norms, normalised top-k weights, no shared expert."""

from __future__ import annotations

import gguf

from rotary_gguf.convert.checkpoint import HFConfig

ARCH = gguf.MODEL_ARCH.QWEN3MOE
EXPERT = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
STACKED = "model.layers.{layer}.mlp.experts.{proj}.weight"
PROJECTIONS = ("down_proj", "gate_proj", "up_proj")


def parameters(cfg: HFConfig, writer: gguf.GGUFWriter) -> None:
    writer.add_expert_feed_forward_length(int(cfg.require("moe_intermediate_size")))
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)

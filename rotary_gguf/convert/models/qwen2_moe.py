"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, a shared expert with its own sigmoid gate."""

from __future__ import annotations

import gguf

from rotary_gguf.convert.checkpoint import HFConfig

ARCH = gguf.MODEL_ARCH.QWEN2MOE
EXPERT = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
STACKED = "model.layers.{layer}.mlp.experts.{proj}.weight"
PROJECTIONS = ("down_proj", "gate_proj", "up_proj")


def parameters(cfg: HFConfig, writer: gguf.GGUFWriter) -> None:
    writer.add_expert_feed_forward_length(int(cfg.require("moe_intermediate_size")))
    if (shared := cfg.get("shared_expert_intermediate_size")) is not None:
        writer.add_expert_shared_feed_forward_length(int(shared))

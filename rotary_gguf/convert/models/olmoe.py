"""OLMoE: q/k norms over the whole projection (llama.cpp needs n_kv_head == n_head), no shared expert."""

from __future__ import annotations

import gguf

from rotary_gguf.convert.checkpoint import ConvertError, HFConfig

ARCH = gguf.MODEL_ARCH.OLMOE
EXPERT = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
STACKED = "model.layers.{layer}.mlp.experts.{proj}.weight"
PROJECTIONS = ("down_proj", "gate_proj", "up_proj")


def parameters(cfg: HFConfig, writer: gguf.GGUFWriter) -> None:
    heads, kv_heads = cfg.require("num_attention_heads"), cfg.get("num_key_value_heads", default=None)
    if kv_heads is not None and kv_heads != heads:
        raise ConvertError(f"OLMoE with {kv_heads} KV heads for {heads} heads: llama.cpp's OLMoE needs them equal")

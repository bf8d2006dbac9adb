"""Mixtral: llama.cpp's llama architecture with experts; q and k rows permuted for its interleaved RoPE."""

from __future__ import annotations

import gguf
import numpy as np

from rotary_gguf.convert.checkpoint import HFConfig

ARCH = gguf.MODEL_ARCH.LLAMA
EXPERT = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight"
STACKED = "layers.{layer}.feed_forward.experts.{proj}.weight"
PROJECTIONS = ("w1", "w2", "w3")


def parameters(cfg: HFConfig, writer: gguf.GGUFWriter) -> None:
    writer.add_rope_dimension_count(cfg.head_dim)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows to llama.cpp's interleaved pairs (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(name: str, data: np.ndarray, cfg: HFConfig) -> np.ndarray:
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return _permute(data, int(cfg.require("num_attention_heads")))
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return _permute(data, int(cfg.get("num_key_value_heads", "num_attention_heads")))
    return data

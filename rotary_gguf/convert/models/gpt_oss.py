"""gpt-oss: experts stored fused per layer (gate and up interleaved in one tensor, all experts in one
tensor, [experts, in, out] order) with biases; a biased router; attention sinks; YaRN RoPE; alternating
sliding-window layers. Unquantized (bf16) checkpoints only: the MXFP4 release is not read here."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gguf
import numpy as np

from rotary_gguf.convert.checkpoint import ConvertError, HFConfig, StoredTensor, read_tensor

log = logging.getLogger(__name__)
ARCH = gguf.MODEL_ARCH.GPT_OSS
EXPERT = r"(?!)"  # no per-expert tensors: derive() splits the fused ones
STACKED = ""
PROJECTIONS = ()


def parameters(cfg: HFConfig, writer: gguf.GGUFWriter) -> None:
    writer.add_sliding_window(int(cfg.require("sliding_window")))
    writer.add_expert_feed_forward_length(int(cfg.require("intermediate_size")))
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    rope = cfg.get("rope_scaling", "rope_parameters", default={}) or {}
    if rope.get("rope_type") == "yarn" and rope.get("truncate") is False:
        log.warning("gpt-oss YaRN with truncate=false: llama.cpp always rounds the correction range, so RoPE "
                    "(and the logits) differ slightly from transformers'")
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if key in rope:
                add(float(rope[key]))


def _part(t: StoredTensor, take: Callable[[np.ndarray], np.ndarray]) -> Callable[[int], np.ndarray]:
    return lambda e: np.ascontiguousarray(take(read_tensor(t, slice(e, e + 1))[0]))


def rename(name: str, cfg: HFConfig) -> str:
    """Checkpoint names that gguf-py's table knows under another form."""
    return name + ".weight" if name.endswith("self_attn.sinks") else name


def derive(name: str, t: StoredTensor, cfg: HFConfig) -> list[tuple[str, tuple[int, ...], Callable]] | None:
    """The GGUF parts of a fused expert tensor (as convert_hf_to_gguf.py splits them), else None."""
    base, _, kind = name.rpartition(".experts.")
    if not base:
        return None
    prefix = f"{base}.experts."
    n, *rest = t.shape
    if kind == "gate_up_proj":  # [n, in, 2 x ff] -> gate, up: [n, ff, in]
        if len(rest) != 2 or rest[1] % 2:
            raise ConvertError(f"{name}: shape {list(t.shape)} is not [experts, hidden, 2 x ff]")
        shape = (n, rest[1] // 2, rest[0])
        return [(prefix + "gate_proj.weight", shape, _part(t, lambda x: x.T[0::2])),
                (prefix + "up_proj.weight", shape, _part(t, lambda x: x.T[1::2]))]
    if kind == "gate_up_proj_bias":
        shape = (n, rest[0] // 2)
        return [(prefix + "gate_proj.bias", shape, _part(t, lambda x: x[0::2])),
                (prefix + "up_proj.bias", shape, _part(t, lambda x: x[1::2]))]
    if kind == "down_proj":  # [n, ff, out] -> [n, out, ff]
        return [(prefix + "down_proj.weight", (n, rest[1], rest[0]), _part(t, lambda x: x.T))]
    if kind == "down_proj_bias":
        return [(prefix + "down_proj.bias", t.shape, _part(t, lambda x: x))]
    return None

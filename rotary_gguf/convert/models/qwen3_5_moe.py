"""Qwen3.5/3.6 MoE (Qwen3.6-35B-A3B; llama.cpp qwen35moe): Gated DeltaNet layers with full attention every
few layers (q with an output gate), a shared expert with a sigmoid gate, interleaved M-RoPE on a quarter of
each head. Text-only checkpoints (qwen3_5_moe_text) and the multimodal release (qwen3_5_moe: the text
weights under model.language_model, the vision tower skipped, the MTP block kept as llama.cpp's NextN block
as convert_hf_to_gguf.py does by default). Rewrites follow convert_hf_to_gguf.py's Qwen3_5MoeTextModel:
A_log -> -exp(A_log), dt_bias -> ssm_dt.bias, conv kernels squeezed, RMS norm weights + 1 (not the DeltaNet
output norm), and V heads from grouped-by-K to tiled order where there are more V heads than K heads."""

from __future__ import annotations

import re
from collections.abc import Callable

import gguf
import numpy as np

from rotary_gguf.convert.checkpoint import ConvertError, HFConfig, StoredTensor, read_tensor

ARCH = gguf.MODEL_ARCH.QWEN35MOE
EXPERT = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
STACKED = "model.layers.{layer}.mlp.experts.{proj}.weight"
PROJECTIONS = ("down_proj", "gate_proj", "up_proj")
NO_DENSE_FFN = True
_MROPE_SECTION = [11, 11, 10, 0]  # transformers' default, which llama.cpp's loader requires written
_MTP_LAYER = re.compile(r"(?:model\.)?mtp\.layers\.(\d+)\.(.+)")
_MTP_TOP = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
            "norm": "shared_head.norm"}
_VISION = ("visual.", "vision.", "vision_", "merger.", "patch_embed")


def extra_blocks(cfg: HFConfig, tensors: dict[str, StoredTensor]) -> int:
    """The MTP layers in the checkpoint, written as NextN blocks after the text layers."""
    found = [int(m.group(1)) for name in tensors if (m := _MTP_LAYER.fullmatch(name))]
    return max(found) + 1 if found else 0


def rename(name: str, cfg: HFConfig) -> str | None:
    """convert_hf_to_gguf.py's names: the language model's prefix dropped, mtp.* as block n_layer + i,
    dt_bias as dt_proj.bias; None for the vision tower."""
    if any(part in name for part in _VISION):
        return None
    name = name.replace("language_model.", "")
    n_layer = int(cfg.require("num_hidden_layers"))
    if (m := _MTP_LAYER.fullmatch(name)) is not None:
        name = f"model.layers.{n_layer + int(m.group(1))}.{m.group(2)}"
    elif name.startswith(("mtp.", "model.mtp.")):
        top, _, suffix = name.removeprefix("model.").removeprefix("mtp.").partition(".")
        if top not in _MTP_TOP:
            return name
        name = f"model.layers.{n_layer}.{_MTP_TOP[top]}.{suffix}"
    if name.endswith(".dt_bias"):
        name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
    return name


# NextN tensors that gguf-py 0.19's table does not list for qwen35moe (llama.cpp's loader reads them).
_NEXTN = {"eh_proj": gguf.MODEL_TENSOR.NEXTN_EH_PROJ, "enorm": gguf.MODEL_TENSOR.NEXTN_ENORM,
          "hnorm": gguf.MODEL_TENSOR.NEXTN_HNORM, "shared_head.norm": gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM}
_NEXTN_NAME = re.compile(r"model\.layers\.(\d+)\.(eh_proj|enorm|hnorm|shared_head\.norm)\.weight")


def gguf_name(name: str) -> str | None:
    if (m := _NEXTN_NAME.fullmatch(name)) is None:
        return None
    return gguf.TENSOR_NAMES[_NEXTN[m.group(2)]].format(bid=int(m.group(1))) + ".weight"


def parameters(cfg: HFConfig, writer: gguf.GGUFWriter) -> None:
    writer.add_expert_feed_forward_length(int(cfg.require("moe_intermediate_size")))
    if (shared := cfg.get("shared_expert_intermediate_size")) is not None:
        writer.add_expert_shared_feed_forward_length(int(shared))
    if (head_dim := cfg.get("head_dim")) is not None:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_ssm_conv_kernel(int(cfg.require("linear_conv_kernel_dim")))
    writer.add_ssm_state_size(int(cfg.require("linear_key_head_dim")))
    writer.add_ssm_group_count(int(cfg.require("linear_num_key_heads")))
    writer.add_ssm_time_step_rank(int(cfg.require("linear_num_value_heads")))
    writer.add_ssm_inner_size(int(cfg.require("linear_value_head_dim")) * int(cfg.require("linear_num_value_heads")))
    writer.add_full_attention_interval(int(cfg.get("full_attention_interval", default=4)))
    rope = cfg.get("rope_parameters", "rope_scaling", default={}) or {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default=0.25))
    writer.add_rope_dimension_count(int(cfg.head_dim * factor))
    section = list(rope.get("mrope_section", _MROPE_SECTION))
    writer.add_rope_dimension_sections((section + [0] * 4)[:4])


def block_parameters(cfg: HFConfig, writer: gguf.GGUFWriter, n_block: int) -> None:
    """Keys that depend on the MTP blocks found: which blocks are recurrent, nextn_predict_layers."""
    n_layer = int(cfg.require("num_hidden_layers"))
    if (layer_types := cfg.get("layer_types")) is not None:
        if len(layer_types) != n_layer:
            raise ConvertError(f"layer_types has {len(layer_types)} entries; num_hidden_layers is {n_layer}")
        recurrent = [t == "linear_attention" for t in layer_types] + [False] * (n_block - n_layer)
        writer.add_array(f"{writer.arch}.attention.recurrent_layers", recurrent)  # no add_* in gguf 0.19
    if n_block > n_layer:
        writer.add_nextn_predict_layers(n_block - n_layer)


def _tiled(x: np.ndarray, axis: int, n_k: int, per_k: int, head_dim: int) -> np.ndarray:
    """V heads grouped by K head [G0_v0..v(r-1), G1_v0..] to ggml's tiled broadcast order [G0_v0, G1_v0, ..]."""
    x = np.moveaxis(x, axis, 0)
    shape = x.shape
    x = x.reshape(n_k, per_k, head_dim, *shape[1:]).swapaxes(0, 1).reshape(shape)
    return np.ascontiguousarray(np.moveaxis(x, 0, axis))


def _reorder_v(name: str, x: np.ndarray, cfg: HFConfig) -> np.ndarray:
    n_k, n_v = int(cfg.get("linear_num_key_heads", default=0)), int(cfg.get("linear_num_value_heads", default=0))
    if not n_k or not n_v or n_k == n_v or "linear_attn." not in name:
        return x
    k_dim, v_dim, per_k = int(cfg.require("linear_key_head_dim")), int(cfg.require("linear_value_head_dim")), n_v // n_k
    if ".in_proj_qkv." in name or ".conv1d" in name:  # only the V rows (channels) after q and k
        qk = 2 * k_dim * n_k
        return np.concatenate([x[:qk], _tiled(x[qk:], 0, n_k, per_k, v_dim)])
    if ".in_proj_z." in name:
        return _tiled(x, 0, n_k, per_k, v_dim)
    if ".in_proj_a." in name or ".in_proj_b." in name or name.endswith((".A_log", ".dt_bias")):
        return _tiled(x, 0, n_k, per_k, 1)
    if ".out_proj." in name:
        return _tiled(x, 1, n_k, per_k, v_dim)
    return x


def reshape(name: str, shape: tuple[int, ...], cfg: HFConfig) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1) if ".conv1d" in name else shape


def rewrites(name: str) -> bool:
    """Whether transform() changes the tensor (the rest, embeddings and experts included, convert in pieces)."""
    return "linear_attn." in name or "norm" in name  # the MTP pre_fc_norm_* too


def transform(name: str, data: np.ndarray, cfg: HFConfig) -> np.ndarray:
    name = rename(name, cfg) or name  # the MTP norms (pre_fc_norm_* -> enorm, hnorm) get the + 1 as well
    if ".conv1d" in name:
        data = data.reshape(reshape(name, data.shape, cfg))
    data = _reorder_v(name, data, cfg)
    if name.endswith(".A_log"):
        return -np.exp(data.astype(np.float64)).astype(np.float32)
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return data + np.float32(1)
    return data


def _part(t: StoredTensor, take: Callable[[np.ndarray], np.ndarray]) -> Callable[[int], np.ndarray]:
    return lambda e: np.ascontiguousarray(take(read_tensor(t, slice(e, e + 1))[0]))


def derive(name: str, t: StoredTensor, cfg: HFConfig) -> list[tuple[str, tuple[int, ...], Callable]] | None:
    """Experts stored fused ([experts, 2 x ff, hidden] gate_up_proj, [experts, hidden, ff] down_proj)."""
    base, _, kind = name.removesuffix(".weight").rpartition(".experts.")
    if not base or kind not in ("gate_up_proj", "down_proj"):
        return None
    known = rename(base, cfg)
    if known is None:
        return None
    prefix = f"{known}.experts."
    n, ff, hidden = cfg.n_expert, int(cfg.require("moe_intermediate_size")), int(cfg.require("hidden_size"))
    expected = (n, hidden, ff) if kind == "down_proj" else (n, 2 * ff, hidden)
    if t.shape != expected:
        raise ConvertError(f"{name}: shape {list(t.shape)}; config.json implies {list(expected)} "
                           f"({'experts, hidden, ff' if kind == 'down_proj' else 'experts, 2 x ff, hidden'})")
    if kind == "down_proj":
        return [(prefix + "down_proj.weight", t.shape, _part(t, lambda x: x))]
    return [(prefix + "gate_proj.weight", (n, ff, hidden), _part(t, lambda x: x[:ff])),
            (prefix + "up_proj.weight", (n, ff, hidden), _part(t, lambda x: x[ff:]))]

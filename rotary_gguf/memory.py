"""Per-layer memory llama.cpp allocates besides the weights, from a GGUF's metadata, by the pinned llama.cpp's
rules (src/llama-model.cpp create_memory, src/llama-hparams.cpp, src/llama-memory-{hybrid,recurrent}.cpp):

- a KV cache in attention layers: n_head_kv(il) x (n_embd_head_k(il) + n_embd_head_v(il)) per token;
  sliding-window layers use the `*_swa` head sizes and keep a full-size cache (llama.cpp's default
  `swa_full`, which the runtime keeps); without flash attention V is stored transposed and, when its
  size varies across layers, every layer's V is padded to the largest (llama-kv-cache.cpp
  TAG_V_CACHE_VARIABLE); layers that reuse another layer's cache (gemma4's shared_kv_layers) hold none;
- recurrent state in recurrent layers of hybrid models (`attention.recurrent_layers`, else
  `(il + 1) % full_attention_interval != 0`): F32 conv state n_embd_r = (d_conv - 1) x
  (d_inner + 2 x n_group x d_state) and SSM state n_embd_s = d_state x d_inner per sequence;
- deepseek4 (src/llama-kv-cache-dsv4.cpp): a K-only raw cache in every layer (full-size SWA), compressed
  K caches of GGML_PAD(ceil(ctx / ratio), 256) cells (CSA layers, ratio 4: head_dim, plus the lightning
  indexer's index_head_dim; HCA layers, ratio 128: head_dim), and F32 compressor state (kv and score) per
  sequence: CSA 2 x ratio rows of 2 x head_dim, indexer 2 x ratio rows of 2 x index_head_dim, HCA ratio
  rows of head_dim;
- NextN/MTP layers (the last `nextn_predict_layers`): loaded, never run in normal decoding, no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LayerMemory", "layer_memory"]


@dataclass(frozen=True)
class LayerMemory:
    """What one layer keeps per token (KV elements) and per sequence (recurrent state bytes)."""

    layer: int
    kv_k: int  # K elements per token (0: no KV cache in this layer)
    kv_v: int  # V elements per token
    kv_v_transposed: int = 0  # V elements per token without flash attention (padded to the largest layer's)
    swa_window: int = 0  # sliding-window layer: its window (0: full attention)
    recurrent_bytes: int = 0  # conv + SSM state of one sequence (F32)
    compressed: tuple[tuple[int, int], ...] = ()  # deepseek4: (ratio, K elements per compressed cell) caches
    compressor_bytes: int = 0  # deepseek4: compressor state of one sequence (F32)
    nextn: bool = False  # MTP/NextN block: loaded by llama.cpp, not run in normal decoding

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "kv_k": self.kv_k, "kv_v": self.kv_v, "kv_v_transposed": self.kv_v_transposed,
                "swa_window": self.swa_window,
                "recurrent_bytes": self.recurrent_bytes, "compressed": [list(c) for c in self.compressed],
                "compressor_bytes": self.compressor_bytes, "nextn": self.nextn}


def _flags(value: Any, n_layer: int) -> list[bool] | None:
    if not isinstance(value, list):
        return None
    flags = [bool(v) for v in value][:n_layer]
    return flags + [False] * (n_layer - len(flags))


def _per_layer(value: Any, n_layer: int, default: int) -> list[int]:
    if isinstance(value, list):
        values = [int(v) for v in value][:n_layer]
        return values + [values[-1] if values else default] * (n_layer - len(values))
    try:
        return [int(value)] * n_layer
    except (TypeError, ValueError):
        return [default] * n_layer


def _recurrent_layers(meta: dict[str, Any], arch: str, n_layer: int) -> list[bool]:
    flags = _flags(meta.get(f"{arch}.attention.recurrent_layers"), n_layer)
    if flags is not None:
        return flags
    interval = int(meta.get(f"{arch}.full_attention_interval", 0) or 0)
    if interval and f"{arch}.ssm.state_size" in meta:
        return [(il + 1) % interval != 0 for il in range(n_layer)]
    return [False] * n_layer


def _recurrent_state_bytes(meta: dict[str, Any], arch: str) -> int:
    """(n_embd_r + n_embd_s) x 4 bytes: llama_hparams::n_embd_r/n_embd_s for Mamba-style and Gated DeltaNet
    layers (F32 state, one sequence)."""
    d_conv = int(meta.get(f"{arch}.ssm.conv_kernel", 0) or 0)
    d_inner = int(meta.get(f"{arch}.ssm.inner_size", 0) or 0)
    d_state = int(meta.get(f"{arch}.ssm.state_size", 0) or 0)
    n_group = int(meta.get(f"{arch}.ssm.group_count", 0) or 0)
    conv = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
    return 4 * (conv + d_state * d_inner)


_DSV4_CSA, _DSV4_HCA = 4, 128  # the compression ratios deepseek4.cpp accepts (besides 0)


def _compressed_memory(ratio: int, head_dim: int, index_head_dim: int) -> dict[str, Any]:
    """deepseek4's compressed K caches and compressor state of one layer with this compression ratio."""
    if ratio == _DSV4_CSA:
        return {"compressed": ((ratio, head_dim), (ratio, index_head_dim)),
                "compressor_bytes": 2 * 4 * 2 * ratio * 2 * (head_dim + index_head_dim)}
    if ratio == _DSV4_HCA:
        return {"compressed": ((ratio, head_dim),), "compressor_bytes": 2 * 4 * ratio * head_dim}
    return {}


def layer_memory(meta: dict[str, Any], arch: str, n_layer: int, n_head: int, n_embd: int) -> tuple[LayerMemory, ...]:
    """Each layer's KV elements per token, window, recurrent state and NextN flag (see the module docstring)."""
    head_dim = n_embd // n_head if n_head else 0
    n_head_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", n_head), n_layer, n_head)
    key = int(meta.get(f"{arch}.attention.key_length", head_dim) or head_dim)
    value = int(meta.get(f"{arch}.attention.value_length", head_dim) or head_dim)
    window = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0)
    swa = _flags(meta.get(f"{arch}.attention.sliding_window_pattern"), n_layer) or [False] * n_layer
    key_swa = int(meta.get(f"{arch}.attention.key_length_swa", key) or key)
    value_swa = int(meta.get(f"{arch}.attention.value_length_swa", value) or value)
    recurrent = _recurrent_layers(meta, arch, n_layer)
    state = _recurrent_state_bytes(meta, arch)
    n_nextn = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    # gemma4/gemma3n: the last shared_kv_layers layers read the cache of an earlier layer
    n_kv_from_start = n_layer - n_nextn - int(meta.get(f"{arch}.attention.shared_kv_layers", 0) or 0)
    ratios = _per_layer(meta.get(f"{arch}.attention.compress_ratios", 0), n_layer, 0)
    k_only = f"{arch}.attention.compress_ratios" in meta  # deepseek4's raw cache holds K only
    index_head_dim = int(meta.get(f"{arch}.attention.indexer.key_length", 0) or 0)
    v_max = max((n_head_kv[il] * (value_swa if swa[il] else value) for il in range(n_layer)), default=0)
    layers = []
    for il in range(n_layer):
        nextn = il >= n_layer - n_nextn
        has_kv = not nextn and not recurrent[il] and il < n_kv_from_start
        k, v = (key_swa, value_swa) if swa[il] else (key, value)
        v = 0 if k_only else v
        layers.append(LayerMemory(
            layer=il, kv_k=n_head_kv[il] * k if has_kv else 0, kv_v=n_head_kv[il] * v if has_kv else 0,
            kv_v_transposed=v_max if has_kv and n_head_kv[il] and v else 0,
            **(_compressed_memory(ratios[il], key, index_head_dim) if has_kv else {}),
            swa_window=window if swa[il] else 0, recurrent_bytes=state if recurrent[il] and not nextn else 0,
            nextn=nextn))
    return tuple(layers)

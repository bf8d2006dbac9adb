"""Routers of a MoE model's layers, read from its GGUF for cross-layer prediction: the plugin applies layer
l+1's router to layer l's MoE input to guess layer l+1's experts before it runs (docs/rotation.md,
"Cross-layer prefetch").

What build_moe_ffn (llama.cpp, llama-graph.cpp) selects by: scores = gating(W x + logit_bias) + selection
bias, top n_expert_used. Gemma 4 scales the router's input (ffn_gate_inp.scale) and normalises it, which
does not change a ranking. Expert groups (DeepSeek V3) are not applied: the prediction is a guess, measured
per layer, and a layer whose guesses miss switches its prefetch off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, Keys
from gguf.quants import dequantize

from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex, TensorEntry

# llama_expert_gating_func_type (llama-hparams.h): 0 none (the architecture's default: softmax here)
GATING_BY_CODE = {0: "softmax", 1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrt_softplus"}


class RouterError(RotaryError):
    """A router tensor that cannot be read or does not fit its layer."""


@dataclass(frozen=True)
class Router:
    layer: int
    weight: np.ndarray  # [n_expert, n_embd], float32
    n_used: int
    gating: str  # a key of rotary_gguf.plugin.GATINGS
    logit_bias: np.ndarray | None = None  # [n_expert] (GPT-OSS)
    select_bias: np.ndarray | None = None  # [n_expert] (exp_probs_b: DeepSeek V3, GLM-4.5)
    input_scale: np.ndarray | None = None  # [n_embd] (Gemma 4)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The n_used experts this router selects for input x, best first (the plugin's rule, in numpy, with
        the weights rounded to bfloat16 as the plugin keeps them)."""
        scores = bfloat16(self.weight).astype(np.float64) @ (x * (1 if self.input_scale is None else self.input_scale))
        if self.logit_bias is not None:
            scores = scores + self.logit_bias
        if self.select_bias is not None:
            scores = _gate(scores, self.gating) + self.select_bias
        return np.argsort(-scores, kind="stable")[: self.n_used].astype(np.int32)


def bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def _gate(logits: np.ndarray, gating: str) -> np.ndarray:
    if gating == "softmax":
        e = np.exp(logits - logits.max())
        return e / e.sum()
    if gating == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    if gating == "sqrt_softplus":
        return np.sqrt(np.logaddexp(0, logits))
    return logits


def _values(index: ModelIndex, entry: TensorEntry) -> np.ndarray:
    """A tensor's values as float32, in ggml's shape reversed (rows first)."""
    path = index.files[entry.file] if index.files else index.path
    try:
        raw = np.fromfile(path, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        rows = int(np.prod(entry.shape[1:], dtype=np.int64))
        values = dequantize(raw.reshape(rows, -1), GGMLQuantizationType(entry.type))
        return np.asarray(values, dtype=np.float32).reshape(*reversed(entry.shape))
    except (NotImplementedError, ValueError, OSError) as exc:
        raise RouterError(f"{entry.name}: cannot read a {entry.type.name} tensor of shape {entry.shape} "
                          f"({exc})") from None


def read_routers(index: ModelIndex, layers: list[int] | tuple[int, ...]) -> dict[int, Router]:
    """The routers of these MoE layers (those that have an ffn_gate_inp weight)."""
    by_name = {t.name: t for t in index.tensors}
    code = index.metadata.get(Keys.LLM.EXPERT_GATING_FUNC.format(arch=index.params.arch), 0)
    gating = GATING_BY_CODE.get(int(code), "softmax")
    out = {}
    for layer in layers:
        weight = by_name.get(f"blk.{layer}.ffn_gate_inp.weight")
        if weight is None:
            continue
        w = _values(index, weight)
        n_expert, n_embd = w.shape if w.ndim == 2 else (0, 0)
        optional = {}
        for field, name, size in (("logit_bias", "ffn_gate_inp.bias", n_expert),
                                  ("select_bias", "exp_probs_b.bias", n_expert),
                                  ("input_scale", "ffn_gate_inp.scale", n_embd)):
            entry = by_name.get(f"blk.{layer}.{name}")
            values = _values(index, entry).reshape(-1) if entry is not None else None
            if values is not None and values.size != size:
                raise RouterError(f"blk.{layer}.{name}: {values.size} values, the router needs {size}")
            optional[field] = values
        if n_expert != index.params.n_expert:
            raise RouterError(f"{weight.name}: shape {weight.shape}, the model has {index.params.n_expert} experts")
        out[layer] = Router(layer, w, index.params.n_expert_used, gating, **optional)
    return out

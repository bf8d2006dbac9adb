"""Shapes of synthetic MoE models: presets, and the tensor list each architecture's llama.cpp loader wants.

Shapes are in ggml order (ne0 = row length first), as llama.cpp's `create_tensor` calls write them
(`L/src/models/<arch>.cpp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from rotary_gguf.errors import SynthError

ARCHITECTURES = ("qwen3moe", "qwen2moe", "llama", "olmoe", "gpt-oss")


@dataclass(frozen=True)
class ModelSpec:
    """Hyperparameters of a synthetic MoE model."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int = 0  # qwen2moe's shared expert
    n_vocab: int = 0  # 0: the embedded vocabulary's size; larger: padded with unused tokens
    n_ctx_train: int = 4096
    rope_theta: float = 1_000_000.0
    sliding_window: int = 128  # gpt-oss only

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise SynthError(f"unknown synth architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if not 0 < self.n_expert_used <= self.n_expert:
            raise SynthError(f"n_expert_used {self.n_expert_used} must be in 1..n_expert ({self.n_expert})")
        if self.n_head % self.n_head_kv:
            raise SynthError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")


PRESETS: dict[str, ModelSpec] = {
    # Unit tests: about 1 MB in f32.
    "tiny": ModelSpec("qwen3moe", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=16,
                      n_expert=8, n_expert_used=2, n_ff_exp=32),
    # CPU benchmarks on a developer machine: about 130 MB in Q4_K.
    "small": ModelSpec("qwen3moe", n_layer=12, n_embd=768, n_head=12, n_head_kv=4, head_dim=64,
                       n_expert=32, n_expert_used=4, n_ff_exp=256),
    # The real Qwen3-30B-A3B shapes (about 17 GB in Q4_K), for GPU benchmarks without a download.
    "qwen3-30b-a3b": ModelSpec("qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128,
                               n_expert=128, n_expert_used=8, n_ff_exp=768, n_vocab=151936,
                               n_ctx_train=40960),
}
PRESET_DEFAULT_TYPE = {"tiny": "f32", "small": "q4_k", "qwen3-30b-a3b": "q4_k"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: name, ggml shape, the role that decides its type, and its init std."""

    name: str
    shape: tuple[int, ...]
    role: str  # "norm" (F32 ones), "small" (F32 vector), "weight", "output", "embedding"
    std: float


def for_arch(spec: ModelSpec, arch: str) -> ModelSpec:
    """The same shapes in another architecture's layout, with what that architecture needs: qwen2moe
    gets a shared expert (4x the expert width, as Qwen1.5-MoE), olmoe full multi-head attention
    (its q/k norms span the whole projection)."""
    if arch == spec.arch:
        return spec
    changed = replace(spec, arch=arch, n_ff_shexp=0)
    if arch == "qwen2moe":
        changed = replace(changed, n_ff_shexp=4 * spec.n_ff_exp)
    if arch == "olmoe":
        changed = replace(changed, n_head_kv=spec.n_head)
    return changed


def with_vocab(spec: ModelSpec, n_vocab: int) -> ModelSpec:
    """The spec with its vocabulary size fixed (the embedded vocabulary's, unless the preset pads it)."""
    if spec.n_vocab and spec.n_vocab < n_vocab:
        raise SynthError(f"n_vocab {spec.n_vocab} is smaller than the embedded vocabulary ({n_vocab} tokens)")
    return replace(spec, n_vocab=max(spec.n_vocab, n_vocab))


def tensor_specs(spec: ModelSpec) -> list[TensorSpec]:
    """Every tensor of the model, in file order."""
    e, v = spec.n_embd, spec.n_vocab
    tensors = [TensorSpec("token_embd.weight", (e, v), "embedding", 1.0)]
    for i in range(spec.n_layer):
        tensors += _attention(spec, i) + _moe(spec, i)
    tensors += [
        TensorSpec("output_norm.weight", (e,), "norm", 0.0),
        TensorSpec("output.weight", (e, v), "output", 1 / math.sqrt(e)),
    ]
    return tensors


def _attention(spec: ModelSpec, i: int) -> list[TensorSpec]:
    e, hd = spec.n_embd, spec.head_dim
    q, kv = spec.n_head * hd, spec.n_head_kv * hd
    p = f"blk.{i}."
    residual_scale = 1 / math.sqrt(2 * spec.n_layer)
    out = [
        TensorSpec(p + "attn_norm.weight", (e,), "norm", 0.0),
        TensorSpec(p + "attn_q.weight", (e, q), "weight", 1 / math.sqrt(e)),
        TensorSpec(p + "attn_k.weight", (e, kv), "weight", 1 / math.sqrt(e)),
        TensorSpec(p + "attn_v.weight", (e, kv), "weight", 1 / math.sqrt(e)),
        TensorSpec(p + "attn_output.weight", (q, e), "weight", residual_scale / math.sqrt(q)),
    ]
    if spec.arch in ("qwen2moe", "gpt-oss"):
        out += [TensorSpec(p + f"attn_{x}.bias", (n,), "small", 0.02) for x, n in (("q", q), ("k", kv), ("v", kv))]
    if spec.arch == "qwen3moe":
        out += [TensorSpec(p + "attn_q_norm.weight", (hd,), "norm", 0.0),
                TensorSpec(p + "attn_k_norm.weight", (hd,), "norm", 0.0)]
    if spec.arch == "olmoe":  # olmoe normalises the whole q and k projections
        out += [TensorSpec(p + "attn_q_norm.weight", (q,), "norm", 0.0),
                TensorSpec(p + "attn_k_norm.weight", (kv,), "norm", 0.0)]
    if spec.arch == "gpt-oss":
        out += [TensorSpec(p + "attn_output.bias", (e,), "small", 0.02),
                TensorSpec(p + "attn_sinks.weight", (spec.n_head,), "small", 0.5)]
    return out


def _moe(spec: ModelSpec, i: int) -> list[TensorSpec]:
    e, f, x = spec.n_embd, spec.n_ff_exp, spec.n_expert
    p = f"blk.{i}."
    down_std = 1 / math.sqrt(f) / math.sqrt(2 * spec.n_layer)
    norm = "post_attention_norm" if spec.arch == "gpt-oss" else "ffn_norm"
    out = [
        TensorSpec(p + f"{norm}.weight", (e,), "norm", 0.0),
        # Router logits of unit spread: random routers are chaotic when logits are large.
        TensorSpec(p + "ffn_gate_inp.weight", (e, x), "router", 1 / math.sqrt(e)),
        TensorSpec(p + "ffn_gate_exps.weight", (e, f, x), "weight", 1 / math.sqrt(e)),
        TensorSpec(p + "ffn_up_exps.weight", (e, f, x), "weight", 1 / math.sqrt(e)),
        TensorSpec(p + "ffn_down_exps.weight", (f, e, x), "weight", down_std),
    ]
    if spec.arch == "gpt-oss":
        out += [
            TensorSpec(p + "ffn_gate_inp.bias", (x,), "small", 0.1),
            TensorSpec(p + "ffn_gate_exps.bias", (f, x), "small", 0.02),
            TensorSpec(p + "ffn_up_exps.bias", (f, x), "small", 0.02),
            TensorSpec(p + "ffn_down_exps.bias", (e, x), "small", 0.02),
        ]
    if spec.n_ff_shexp:
        s = spec.n_ff_shexp
        out += [
            TensorSpec(p + "ffn_gate_inp_shexp.weight", (e,), "small", 1 / math.sqrt(e)),
            TensorSpec(p + "ffn_gate_shexp.weight", (e, s), "weight", 1 / math.sqrt(e)),
            TensorSpec(p + "ffn_up_shexp.weight", (e, s), "weight", 1 / math.sqrt(e)),
            TensorSpec(p + "ffn_down_shexp.weight", (s, e), "weight", 1 / math.sqrt(s) / math.sqrt(2 * spec.n_layer)),
        ]
    return out

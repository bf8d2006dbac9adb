"""Shapes of synthetic MoE models: presets, and the tensor list of the classic MoE layouts' llama.cpp loaders
(qwen35moe and gemma4 have their own modules; rotary_gguf.synth.layout picks one).

Shapes are in ggml order (ne0 = row length first), as llama.cpp's `create_tensor` calls write them
(`L/src/models/<arch>.cpp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from rotary_gguf.errors import SynthError

# The classic layouts: for_arch lays any of their presets out in any of them.
ARCHITECTURES = ("qwen3moe", "qwen2moe", "llama", "olmoe", "gpt-oss")
# Hybrid layouts, each with presets of its own: qwen35moe (Gated DeltaNet + gated full attention, Qwen3.5/3.6
# MoE) and gemma4 (sliding + full attention, a dense FFN beside the experts, Gemma 4 MoE).
HYBRID_ARCHITECTURES = ("qwen35moe", "gemma4")


@dataclass(frozen=True)
class DeltaNet:
    """qwen35moe's Gated DeltaNet (linear attention) layers: K and V heads of one size, a short convolution."""

    n_k_heads: int
    n_v_heads: int
    head_dim: int
    conv_kernel: int = 4


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
    sliding_window: int = 128  # gpt-oss, gemma4
    n_rot: int = 0  # rotated dimensions of the full-attention heads (0: all)
    full_attention_interval: int = 0  # qwen35moe, gemma4: every Nth layer is full attention
    delta_net: DeltaNet | None = None  # qwen35moe: the other layers
    swa_head_dim: int = 0  # gemma4: the sliding layers' head size and KV heads (full layers: head_dim, n_head_kv)
    swa_n_head_kv: int = 0
    n_ff: int = 0  # gemma4: the dense FFN beside the experts
    n_nextn: int = 0  # qwen35moe: MTP (NextN) blocks after the n_layer layers

    def __post_init__(self) -> None:
        known = ARCHITECTURES + HYBRID_ARCHITECTURES
        if self.arch not in known:
            raise SynthError(f"unknown synth architecture {self.arch!r}; known: {', '.join(known)}")
        needs = {"qwen35moe": ("delta_net", "full_attention_interval"),
                 "gemma4": ("swa_head_dim", "swa_n_head_kv", "n_ff", "full_attention_interval")}
        missing = [name for name in needs.get(self.arch, ()) if not getattr(self, name)]
        if missing:
            raise SynthError(f"a {self.arch} spec needs {', '.join(missing)}")
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
    # The hybrid layouts at the shapes of the family fixtures (tests/conftest.py), with one MTP block.
    "qwen35moe-tiny": ModelSpec("qwen35moe", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, head_dim=32,
                                n_expert=8, n_expert_used=2, n_ff_exp=32, n_ff_shexp=32, n_rot=8,
                                full_attention_interval=4, delta_net=DeltaNet(2, 4, 16), n_nextn=1),
    "gemma4-tiny": ModelSpec("gemma4", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, head_dim=32,
                             n_expert=8, n_expert_used=2, n_ff_exp=32, sliding_window=32, n_rot=8,
                             full_attention_interval=4, swa_head_dim=16, swa_n_head_kv=2, n_ff=96),
    # Qwen3.6-35B-A3B (~20 GB in Q4_K): 30 Gated DeltaNet + 10 gated attention layers, one MTP block.
    "qwen3.6-35b-a3b": ModelSpec("qwen35moe", n_layer=40, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256,
                                 n_expert=256, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512, n_vocab=248320,
                                 n_ctx_train=262144, rope_theta=10_000_000.0, n_rot=64, full_attention_interval=4,
                                 delta_net=DeltaNet(16, 32, 128), n_nextn=1),
    # Gemma 4 26B-A4B (~18 GB in Q4_K, down projections in Q8_0): 25 sliding + 5 full attention layers
    # (docs/models.md says which numbers are verified).
    "gemma4-26b-a4b": ModelSpec("gemma4", n_layer=30, n_embd=2816, n_head=16, n_head_kv=2, head_dim=512,
                                n_expert=128, n_expert_used=8, n_ff_exp=704, n_vocab=262144, n_ctx_train=262144,
                                sliding_window=1024, n_rot=128, full_attention_interval=6, swa_head_dim=256,
                                swa_n_head_kv=8, n_ff=2112),
}
PRESET_DEFAULT_TYPE = {"tiny": "f32", "small": "q4_k", "qwen3-30b-a3b": "q4_k", "qwen35moe-tiny": "f32",
                       "gemma4-tiny": "f32", "qwen3.6-35b-a3b": "q4_k", "gemma4-26b-a4b": "q4_k"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: name, ggml shape, the role that decides its type, and its init std."""

    name: str
    shape: tuple[int, ...]
    role: str  # "norm" (F32 ones), "small" (F32 vector), "constant" (F32 values), "weight", "output", "embedding"
    std: float
    values: tuple[float, ...] = ()  # role "constant"


def for_arch(spec: ModelSpec, arch: str) -> ModelSpec:
    """The same shapes in another architecture's layout, with what that architecture needs: qwen2moe
    gets a shared expert (4x the expert width, as Qwen1.5-MoE), olmoe full multi-head attention
    (its q/k norms span the whole projection). The hybrid layouts have presets of their own."""
    if arch == spec.arch:
        return spec
    if arch in HYBRID_ARCHITECTURES or spec.arch in HYBRID_ARCHITECTURES:
        hybrid = {arch, spec.arch} & set(HYBRID_ARCHITECTURES)
        own = ", ".join(name for name, preset in PRESETS.items() if preset.arch in hybrid)
        raise SynthError(f"cannot lay a {spec.arch} preset out as {arch}; {'/'.join(sorted(hybrid))} models come "
                         f"from their own presets: {own}")
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


def classic_tensors(spec: ModelSpec) -> list[TensorSpec]:
    """Every tensor of a classic-layout model, in file order."""
    tensors = [embedding(spec)]
    for i in range(spec.n_layer):
        tensors += _attention(spec, i) + _moe(spec, i)
    return tensors + output_head(spec)


def embedding(spec: ModelSpec) -> TensorSpec:
    return TensorSpec("token_embd.weight", (spec.n_embd, spec.n_vocab), "embedding", 1.0)


def output_head(spec: ModelSpec, tied: bool = False) -> list[TensorSpec]:
    """The final norm and, unless tied to the embedding, the output projection."""
    e = spec.n_embd
    head = [TensorSpec("output.weight", (e, spec.n_vocab), "output", 1 / math.sqrt(e))]
    return [TensorSpec("output_norm.weight", (e,), "norm", 0.0)] + ([] if tied else head)


def norm(name: str, n: int) -> TensorSpec:
    return TensorSpec(name, (n,), "norm", 0.0)


def weight(name: str, n_in: int, *rest: int, residual_layers: int = 0) -> TensorSpec:
    """A projection from n_in, of unit output spread (scaled down for the residual stream of n layers)."""
    std = 1 / math.sqrt(n_in) / (math.sqrt(2 * residual_layers) if residual_layers else 1)
    return TensorSpec(name, (n_in, *rest), "weight", std)


def routed_experts(spec: ModelSpec, i: int, fused: bool) -> list[TensorSpec]:
    """Router and routed experts of layer i: gate and up apart, or fused as ffn_gate_up_exps."""
    e, f, x, p = spec.n_embd, spec.n_ff_exp, spec.n_expert, f"blk.{i}."
    gate_up = ([weight(p + "ffn_gate_up_exps.weight", e, 2 * f, x)] if fused else
               [weight(p + "ffn_gate_exps.weight", e, f, x), weight(p + "ffn_up_exps.weight", e, f, x)])
    # Router logits of unit spread: random routers are chaotic when logits are large.
    return [TensorSpec(p + "ffn_gate_inp.weight", (e, x), "router", 1 / math.sqrt(e)), *gate_up,
            weight(p + "ffn_down_exps.weight", f, e, x, residual_layers=spec.n_layer)]


def shared_expert(spec: ModelSpec, i: int, gate_shape: tuple[int, ...]) -> list[TensorSpec]:
    """The shared expert of layer i and its sigmoid gate."""
    e, s, p = spec.n_embd, spec.n_ff_shexp, f"blk.{i}."
    return [
        TensorSpec(p + "ffn_gate_inp_shexp.weight", gate_shape, "small", 1 / math.sqrt(e)),
        weight(p + "ffn_gate_shexp.weight", e, s),
        weight(p + "ffn_up_shexp.weight", e, s),
        weight(p + "ffn_down_shexp.weight", s, e, residual_layers=spec.n_layer),
    ]


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
    ffn_norm = "post_attention_norm" if spec.arch == "gpt-oss" else "ffn_norm"
    out = [norm(p + f"{ffn_norm}.weight", e), *routed_experts(spec, i, fused=False)]
    if spec.arch == "gpt-oss":
        out += [
            TensorSpec(p + "ffn_gate_inp.bias", (x,), "small", 0.1),
            TensorSpec(p + "ffn_gate_exps.bias", (f, x), "small", 0.02),
            TensorSpec(p + "ffn_up_exps.bias", (f, x), "small", 0.02),
            TensorSpec(p + "ffn_down_exps.bias", (e, x), "small", 0.02),
        ]
    if spec.n_ff_shexp:
        out += shared_expert(spec, i, (e,))
    return out

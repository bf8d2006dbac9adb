"""The qwen35moe layout (Qwen3.5/3.6 MoE): Gated DeltaNet layers with full attention every Nth layer, a
shared expert with a sigmoid gate, fused gate_up experts, and MTP blocks after the last layer.

Tensors and keys as llama.cpp's convert_hf_to_gguf.py writes them with --fuse-gate-up-exps
(`L/conversion/qwen.py` Qwen3_5MoeTextModel, _QwenMtpMixin), shapes as `L/src/models/qwen35moe.cpp` loads them.
"""

from __future__ import annotations

import math

from gguf import GGUFWriter

from rotary_gguf.synth.spec import (
    ModelSpec,
    TensorSpec,
    embedding,
    norm,
    output_head,
    routed_experts,
    shared_expert,
    weight,
)

# Interleaved MRoPE sections the converter writes when the config has none (_Qwen35MRopeMixin).
ROPE_SECTIONS = [11, 11, 10, 0]
# LLM_KV_ATTENTION_RECURRENT_LAYERS of the pinned llama.cpp (L/src/llama-arch.cpp), newer than the installed gguf-py.
RECURRENT_LAYERS_KEY = "{arch}.attention.recurrent_layers"


def is_recurrent(spec: ModelSpec, i: int) -> bool:
    """Whether layer i is a Gated DeltaNet layer (MTP blocks are attention blocks)."""
    return i < spec.n_layer and (i + 1) % spec.full_attention_interval != 0


def tensors(spec: ModelSpec) -> list[TensorSpec]:
    """Every tensor of the model, MTP blocks last."""
    out = [embedding(spec)]
    for i in range(spec.n_layer + spec.n_nextn):
        mixer = _delta_net(spec, i) if is_recurrent(spec, i) else _attention(spec, i)
        out += [norm(f"blk.{i}.attn_norm.weight", spec.n_embd), *mixer,
                norm(f"blk.{i}.post_attention_norm.weight", spec.n_embd),
                *routed_experts(spec, i, fused=True), *shared_expert(spec, i, (spec.n_embd, 1))]
        if i >= spec.n_layer:
            out += _nextn(spec, i)
    return out + output_head(spec)


def add_hparams(writer: GGUFWriter, spec: ModelSpec) -> None:
    net = spec.delta_net
    assert net is not None  # ModelSpec checks it
    writer.add_expert_feed_forward_length(spec.n_ff_exp)
    writer.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
    writer.add_ssm_conv_kernel(net.conv_kernel)
    writer.add_ssm_state_size(net.head_dim)
    writer.add_ssm_group_count(net.n_k_heads)
    writer.add_ssm_time_step_rank(net.n_v_heads)
    writer.add_ssm_inner_size(net.head_dim * net.n_v_heads)
    writer.add_array(RECURRENT_LAYERS_KEY.format(arch=spec.arch),
                     [is_recurrent(spec, i) for i in range(spec.n_layer + spec.n_nextn)])
    writer.add_full_attention_interval(spec.full_attention_interval)
    writer.add_rope_dimension_count(spec.n_rot or spec.head_dim)
    writer.add_rope_dimension_sections(ROPE_SECTIONS)
    if spec.n_nextn:
        writer.add_nextn_predict_layers(spec.n_nextn)


def _attention(spec: ModelSpec, i: int) -> list[TensorSpec]:
    """Full attention whose q projection carries the output gate (2 x n_head x head_dim rows)."""
    e, hd, p = spec.n_embd, spec.head_dim, f"blk.{i}."
    q, kv = spec.n_head * hd, spec.n_head_kv * hd
    return [
        weight(p + "attn_q.weight", e, 2 * q), weight(p + "attn_k.weight", e, kv), weight(p + "attn_v.weight", e, kv),
        weight(p + "attn_output.weight", q, e, residual_layers=spec.n_layer),
        norm(p + "attn_q_norm.weight", hd), norm(p + "attn_k_norm.weight", hd),
    ]


def _delta_net(spec: ModelSpec, i: int) -> list[TensorSpec]:
    net = spec.delta_net
    assert net is not None
    e, p = spec.n_embd, f"blk.{i}."
    value_dim = net.head_dim * net.n_v_heads
    conv_dim = 2 * net.head_dim * net.n_k_heads + value_dim
    return [
        # A = -exp(A_log) < 0: the state decays, as a trained model's does.
        TensorSpec(p + "ssm_a", (net.n_v_heads,), "constant", 0.0, (-1.0,) * net.n_v_heads),
        TensorSpec(p + "ssm_conv1d.weight", (net.conv_kernel, conv_dim), "small", 1 / math.sqrt(net.conv_kernel)),
        TensorSpec(p + "ssm_dt.bias", (net.n_v_heads,), "small", 0.1),
        weight(p + "ssm_alpha.weight", e, net.n_v_heads),
        weight(p + "ssm_beta.weight", e, net.n_v_heads),
        weight(p + "attn_qkv.weight", e, conv_dim),
        weight(p + "attn_gate.weight", e, value_dim),
        norm(p + "ssm_norm.weight", net.head_dim),
        weight(p + "ssm_out.weight", value_dim, e, residual_layers=spec.n_layer),
    ]


def _nextn(spec: ModelSpec, i: int) -> list[TensorSpec]:
    """The MTP block's own tensors: it shares the embedding and output head with the model."""
    e, p = spec.n_embd, f"blk.{i}.nextn."
    return [weight(p + "eh_proj.weight", 2 * e, e), norm(p + "enorm.weight", e), norm(p + "hnorm.weight", e),
            norm(p + "shared_head_norm.weight", e)]

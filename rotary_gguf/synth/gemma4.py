"""The gemma4 layout (Gemma 4 MoE text model): sliding-window layers with a full-attention layer every Nth,
a dense FFN beside fused gate_up experts, a per-expert down scale, and the embedding tied to the output.

Tensors and keys as llama.cpp's convert_hf_to_gguf.py writes them (`L/conversion/gemma.py` Gemma4Model),
shapes as `L/src/models/gemma4.cpp` loads them. Full-attention layers have no v projection (V = K, as the
26B-A4B's attention_k_eq_v).
"""

from __future__ import annotations

from gguf import GGUFWriter

from rotary_gguf.synth.spec import ModelSpec, TensorSpec, embedding, norm, output_head, routed_experts, weight

ROPE_THETA_SWA = 10_000.0  # the sliding layers' rope base
FINAL_LOGIT_SOFTCAP = 30.0


def is_sliding(spec: ModelSpec, i: int) -> bool:
    return (i + 1) % spec.full_attention_interval != 0


def tensors(spec: ModelSpec) -> list[TensorSpec]:
    """Every tensor of the model."""
    out = [_rope_freqs(spec), embedding(spec)]
    for i in range(spec.n_layer):
        out += _attention(spec, i) + _ffn(spec, i)
    return out + output_head(spec, tied=True)


def add_hparams(writer: GGUFWriter, spec: ModelSpec) -> None:
    sliding = [is_sliding(spec, i) for i in range(spec.n_layer)]
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count_kv([spec.swa_n_head_kv if s else spec.n_head_kv for s in sliding])
    writer.add_rope_freq_base_swa(ROPE_THETA_SWA)
    writer.add_sliding_window(spec.sliding_window)
    writer.add_shared_kv_layers(0)
    writer.add_embedding_length_per_layer_input(0)
    writer.add_sliding_window_pattern(sliding)
    writer.add_key_length_swa(spec.swa_head_dim)
    writer.add_value_length_swa(spec.swa_head_dim)
    writer.add_expert_feed_forward_length(spec.n_ff_exp)
    # Full layers rotate n_rot of head_dim dimensions through rope_freqs ("proportional" rope).
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_dimension_count_swa(spec.swa_head_dim)
    writer.add_final_logit_softcapping(FINAL_LOGIT_SOFTCAP)


def _rope_freqs(spec: ModelSpec) -> TensorSpec:
    """Frequency factors of the full layers: 1 for the rotated pairs, 1e30 (no rotation) for the rest."""
    rotated, half = (spec.n_rot or spec.head_dim) // 2, spec.head_dim // 2
    return TensorSpec("rope_freqs.weight", (half,), "constant", 0.0, (1.0,) * rotated + (1e30,) * (half - rotated))


def _attention(spec: ModelSpec, i: int) -> list[TensorSpec]:
    e, p = spec.n_embd, f"blk.{i}."
    sliding = is_sliding(spec, i)
    hd, n_kv = (spec.swa_head_dim, spec.swa_n_head_kv) if sliding else (spec.head_dim, spec.n_head_kv)
    q, kv = spec.n_head * hd, n_kv * hd
    v = [weight(p + "attn_v.weight", e, kv)] if sliding else []
    return [
        norm(p + "attn_norm.weight", e),
        weight(p + "attn_q.weight", e, q), weight(p + "attn_k.weight", e, kv), *v,
        weight(p + "attn_output.weight", q, e, residual_layers=spec.n_layer),
        norm(p + "attn_q_norm.weight", hd), norm(p + "attn_k_norm.weight", hd),
        norm(p + "post_attention_norm.weight", e),
        norm(p + "layer_output_scale.weight", 1),
    ]


def _ffn(spec: ModelSpec, i: int) -> list[TensorSpec]:
    """The dense FFN and the experts, each with its own norms; the router has a per-channel input scale."""
    e, f, p = spec.n_embd, spec.n_ff, f"blk.{i}."
    return [
        norm(p + "ffn_norm.weight", e),
        weight(p + "ffn_gate.weight", e, f), weight(p + "ffn_up.weight", e, f),
        weight(p + "ffn_down.weight", f, e, residual_layers=spec.n_layer),
        norm(p + "post_ffw_norm.weight", e),
        norm(p + "pre_ffw_norm_2.weight", e),
        norm(p + "post_ffw_norm_1.weight", e),
        norm(p + "post_ffw_norm_2.weight", e),
        *routed_experts(spec, i, fused=True),
        norm(p + "ffn_gate_inp.scale", e),
        norm(p + "ffn_down_exps.scale", spec.n_expert),
    ]

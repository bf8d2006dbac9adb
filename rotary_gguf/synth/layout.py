"""Each synth architecture's tensor list and metadata keys: the classic layouts (spec.py) and the hybrid
layouts' own modules (qwen35moe.py, gemma4.py)."""

from __future__ import annotations

from collections.abc import Callable

from gguf import GGUFWriter, LlamaFileType
from gguf.constants import GGMLQuantizationType as T

from rotary_gguf.synth import gemma4, qwen35moe
from rotary_gguf.synth.spec import ModelSpec, TensorSpec, classic_tensors

_TENSORS: dict[str, Callable[[ModelSpec], list[TensorSpec]]] = {
    "qwen35moe": qwen35moe.tensors, "gemma4": gemma4.tensors}
_HPARAMS: dict[str, Callable[[GGUFWriter, ModelSpec], None]] = {
    "qwen35moe": qwen35moe.add_hparams, "gemma4": gemma4.add_hparams}
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
              T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
              T.Q6_K: LlamaFileType.MOSTLY_Q6_K}


def tensor_specs(spec: ModelSpec) -> list[TensorSpec]:
    """Every tensor of the model, in file order."""
    return _TENSORS.get(spec.arch, classic_tensors)(spec)


def add_hparams(writer: GGUFWriter, spec: ModelSpec, qtype: T, description: str) -> None:
    """The general keys and the architecture's hyperparameters."""
    writer.add_name(description.split(":")[0])
    writer.add_description(description)
    writer.add_file_type(int(FILE_TYPES[qtype]))
    writer.add_quantization_version(2)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer + spec.n_nextn)
    writer.add_head_count(spec.n_head)
    if spec.arch != "gemma4":  # gemma4 writes one per layer
        writer.add_head_count_kv(spec.n_head_kv)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_expert_count(spec.n_expert)
    writer.add_expert_used_count(spec.n_expert_used)
    _HPARAMS.get(spec.arch, _add_classic_hparams)(writer, spec)


def _add_classic_hparams(writer: GGUFWriter, spec: ModelSpec) -> None:
    # llama (Mixtral) and olmoe read the expert width from feed_forward_length.
    expert_width_in_ff = spec.arch in ("llama", "olmoe")
    writer.add_feed_forward_length(spec.n_ff_exp if expert_width_in_ff else spec.n_ff_exp * spec.n_expert_used)
    writer.add_rope_dimension_count(spec.head_dim)
    if not expert_width_in_ff:
        writer.add_expert_feed_forward_length(spec.n_ff_exp)
    if spec.n_ff_shexp:
        writer.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
    if spec.arch == "gpt-oss":
        writer.add_sliding_window(spec.sliding_window)

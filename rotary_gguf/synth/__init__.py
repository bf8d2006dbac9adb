"""Synthetic models: random-weight MoE GGUFs llama.cpp runs, and tiny HF checkpoints for the converter."""

from rotary_gguf.synth.spec import ARCHITECTURES, HYBRID_ARCHITECTURES, PRESET_DEFAULT_TYPE, PRESETS, ModelSpec
from rotary_gguf.synth.writer import TYPE_NAMES, SynthResult, synth_model

__all__ = [
    "ARCHITECTURES",
    "HYBRID_ARCHITECTURES",
    "PRESETS",
    "PRESET_DEFAULT_TYPE",
    "TYPE_NAMES",
    "ModelSpec",
    "SynthResult",
    "synth_model",
]

"""One module per HF model_type: the GGUF architecture, how per-expert tensors are named and stacked, the
architecture's own metadata keys, and any tensor rewrite (found with importlib, as mlx-lm does)."""

from __future__ import annotations

import importlib
from types import ModuleType

from rotary_gguf.convert.checkpoint import ConvertError

SUPPORTED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "qwen3_5_moe", "glm4_moe", "gemma4")
# Other model_type names of a supported family (a text-only checkpoint of a multimodal release).
ALIASES = {"qwen3_5_moe_text": "qwen3_5_moe", "gemma4_text": "gemma4"}
# Dense relatives, named in the error so that a user sees why their checkpoint is refused.
_DENSE = ("llama", "qwen2", "qwen3", "mistral", "olmo", "olmo2", "gemma", "gemma2", "gemma3", "phi3")
# MoE families rotary does not convert, with the reason (said in the error).
_REFUSED = {
    "deepseek_v4": "its release stores the routed experts as MXFP4 codes with E8M0 scales (and attention in "
                   "FP8), which rotary's converter does not read; convert it with llama.cpp's convert_hf_to_gguf.py "
                   "and run that GGUF",
}


def model_module(model_type: str) -> ModuleType:
    if model_type in _REFUSED:
        raise ConvertError(f"model_type {model_type!r} is not converted by rotary: {_REFUSED[model_type]}")
    if model_type in _DENSE:
        raise ConvertError(f"model_type {model_type!r} is a dense model; rotary converts Mixture-of-Experts "
                           f"checkpoints: {', '.join(SUPPORTED)}")
    family = ALIASES.get(model_type, model_type)
    if family not in SUPPORTED:
        raise ConvertError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
    return importlib.import_module(f"rotary_gguf.convert.models.{family}")

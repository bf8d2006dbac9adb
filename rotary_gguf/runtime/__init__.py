"""The runtime: the only code that touches llama-cpp-python and the scheduler plugin.

Engine.open(model, profile, placement, EngineOptions(...)) opens a model for use; every command runs
through it. Modules: llama (llama.cpp in this process), options, loader (load with a placement, dry run,
quantize), scheduler (the plugin and each model's rotation), generation (streams), stats, engine.
"""

from __future__ import annotations

from rotary_gguf.runtime.engine import PLACEMENTS, Engine, ModelSetup, prepare
from rotary_gguf.runtime.generation import ContextError, Generation, Sampling, Stream
from rotary_gguf.runtime.llama import Buffer, default_threads, gpu_device_name, library_dir
from rotary_gguf.runtime.loader import dry_run, quantize
from rotary_gguf.runtime.options import EngineOptions, OptionsError
from rotary_gguf.runtime.scheduler import PluginError, rotary_unavailable, scheduler_plugin
from rotary_gguf.runtime.stats import EngineStats, RotaryStats

__all__ = [
    "PLACEMENTS", "Buffer", "ContextError", "Engine", "EngineOptions", "EngineStats", "Generation", "ModelSetup",
    "OptionsError", "PluginError", "RotaryStats", "Sampling", "Stream", "default_threads", "dry_run",
    "gpu_device_name", "library_dir", "prepare", "quantize", "rotary_unavailable", "scheduler_plugin",
]

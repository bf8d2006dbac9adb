"""Every environment variable rotary-gguf reads, in one place (the README's table lists them)."""

from __future__ import annotations

import os
from pathlib import Path

from rotary_gguf.errors import RotaryError

CACHE = "ROTARY_CACHE"  # where rotary keeps what it makes (demo models, ggml headers, plugin build)
PLUGIN = "ROTARY_PLUGIN"  # the scheduler plugin library to load instead of the installed one
SCHED_DEVICE = "ROTARY_SCHED_DEVICE"  # "cpu": a second CPU backend stands in for the GPU
SCHED_MAX_BATCH = "ROTARY_SCHED_MAX_BATCH"  # batches above this many tokens are left to llama.cpp
LIB_PATH = "LLAMA_CPP_LIB_PATH"  # libllama and libggml* from this folder (llama-cpp-python's own variable)


def _get(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def cache_override() -> Path | None:
    value = _get(CACHE)
    return Path(value) if value else None


def xdg_cache_home() -> Path:
    value = _get("XDG_CACHE_HOME")
    return Path(value) if value else Path.home() / ".cache"


def plugin_override() -> Path | None:
    value = _get(PLUGIN)
    return Path(value) if value else None


def sched_device_is_cpu() -> bool:
    return (_get(SCHED_DEVICE) or "").lower() == "cpu"


def sched_max_batch() -> int | None:
    """The plugin's batch threshold from the environment (<= 0: every batch), or None when unset."""
    value = _get(SCHED_MAX_BATCH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise RotaryError(f"{SCHED_MAX_BATCH}={value!r}: expected a whole number of tokens") from None


def library_override() -> Path | None:
    value = _get(LIB_PATH)
    return Path(value) if value else None

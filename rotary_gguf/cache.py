"""Where rotary keeps what it makes for itself (synthetic demo models, the ggml headers of the plugin build)."""

from __future__ import annotations

from pathlib import Path

from rotary_gguf import environment


def cache_dir() -> Path:
    """$ROTARY_CACHE, else $XDG_CACHE_HOME/rotary-gguf, else ~/.cache/rotary-gguf."""
    return environment.cache_override() or environment.xdg_cache_home() / "rotary-gguf"

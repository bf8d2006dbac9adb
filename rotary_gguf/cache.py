"""Where rotary keeps what it makes for itself (synthetic demo models, the ggml headers of the plugin build)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$ROTARY_CACHE, else $XDG_CACHE_HOME/rotary-gguf, else ~/.cache/rotary-gguf."""
    if os.environ.get("ROTARY_CACHE"):
        return Path(os.environ["ROTARY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rotary-gguf"

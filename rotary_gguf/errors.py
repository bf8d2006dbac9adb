"""The one error hierarchy of rotary-gguf.

Library code raises these; only the CLI turns them into an exit status (2) and one line on stderr.
Messages carry the file, the numbers and, where one exists, a hint.
"""

from __future__ import annotations


class RotaryError(Exception):
    """Base of every error rotary-gguf reports to a user."""


class GGUFError(RotaryError):
    """A GGUF file cannot be used: not a GGUF, truncated, or inconsistent."""


class NotGGUFError(GGUFError):
    """The file does not start with the GGUF magic."""


class MalformedGGUFError(GGUFError):
    """The header, a key or a tensor description is corrupt or runs past the end of the file."""


class UnknownTypeError(GGUFError):
    """A tensor uses a ggml type this version does not know."""


class NotMoEError(RotaryError):
    """A dense model was given to a command that works on routed experts."""


class SynthError(RotaryError):
    """A synthetic model or checkpoint cannot be written as asked."""


class RuntimeLoadError(RotaryError):
    """llama.cpp could not load the model or create a context."""

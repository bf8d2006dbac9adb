"""rotary-gguf: run large Mixture-of-Experts GGUF models on small GPUs."""

__version__ = "0.1.0"

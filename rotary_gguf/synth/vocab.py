"""The embedded byte-level BPE vocabulary and ChatML template that synthetic models carry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from gguf import GGUFWriter, TokenType

# The split that llama.cpp's "qwen2" pre-tokenizer applies (and Qwen's tokenizer.json declares).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen's ChatML template (system prompt optional, generation prompt on request).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]
    merges: tuple[str, ...]
    special_tokens: tuple[str, ...]

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)


@lru_cache(maxsize=1)
def embedded_vocabulary() -> Vocabulary:
    """The vocabulary trained by scripts/train_vocab.py, shipped in rotary_gguf/data."""
    raw = json.loads(resources.files("rotary_gguf.data").joinpath("bpe_vocab.json").read_text("utf-8"))
    return Vocabulary(tuple(raw["tokens"]), tuple(raw["merges"]), tuple(raw["special_tokens"]))


def add_tokenizer(writer: GGUFWriter, n_vocab: int, chat_template: str | None = None) -> None:
    """Write a GPT-2 style BPE tokenizer of n_vocab tokens (padding with unused tokens) and the template."""
    vocab = embedded_vocabulary()
    n_pad = n_vocab - len(vocab.tokens)
    tokens = list(vocab.tokens) + [f"<|pad_{i}|>" for i in range(n_pad)]
    types = [TokenType.CONTROL if t in vocab.special_tokens else TokenType.NORMAL for t in vocab.tokens]
    types += [TokenType.UNUSED] * n_pad
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(vocab.merges))
    writer.add_bos_token_id(vocab.id_of("<|endoftext|>"))
    writer.add_eos_token_id(vocab.id_of("<|im_end|>"))
    writer.add_pad_token_id(vocab.id_of("<|endoftext|>"))
    writer.add_add_bos_token(False)
    template = CHAT_TEMPLATE if chat_template is None else chat_template
    if template:
        writer.add_chat_template(template)

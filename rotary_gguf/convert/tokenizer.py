"""The tokenizer and chat template of an HF checkpoint, carried into GGUF without transformers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf

from rotary_gguf.convert.checkpoint import ConvertError

log = logging.getLogger(__name__)

# Pre-tokenizer split expressions llama.cpp knows by name (llama-vocab.cpp), recognised in tokenizer.json.
_KNOWN_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen35",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
}


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer, or "default" (with a warning) when it is not recognised."""
    parts = (spec or {}).get("pretokenizers") or ([spec] if spec else [])
    for part in parts:
        regex = (part.get("pattern") or {}).get("Regex") if isinstance(part, dict) else None
        if regex in _KNOWN_SPLITS:
            return _KNOWN_SPLITS[regex]
        if isinstance(part, dict) and part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return "gpt-2"
    log.warning("unrecognised pre-tokenizer in tokenizer.json: using llama.cpp's default; text may split "
                "differently from transformers")
    return "default"


def add_vocab(writer: gguf.GGUFWriter, folder: Path, n_vocab: int, pre_names: dict[str, str] | None = None,
              special_tokens: dict[str, str] | None = None) -> None:
    """A byte-level BPE tokenizer.json as tokenizer.ggml.* keys (padded to n_vocab), plus the special
    tokens, merges and chat template gguf-py's SpecialVocab reads from the folder. A family may name its
    pre-tokenizer otherwise (pre_names: GLM's llama-bpe split is llama.cpp's "glm4") and set special tokens
    by their text (special_tokens: kind -> token, where the tokenizer has that token)."""
    path = folder / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
    except FileNotFoundError:
        raise ConvertError(f"{folder}: no tokenizer.json (a byte-level BPE tokenizer is needed)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConvertError(f"{path}: unreadable tokenizer: {exc}") from None
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: tokenizer model {model.get('type')!r}; only BPE tokenizers are supported")
    if model.get("byte_fallback"):  # SentencePiece's BPE (Mixtral's release): not byte-level, not "gpt2"
        raise ConvertError(f"{path}: a SentencePiece-style tokenizer (BPE with byte_fallback) is not converted for "
                           "this family yet; llama.cpp's convert_hf_to_gguf.py writes it as a llama vocabulary")
    by_id = {int(i): tok for tok, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise ConvertError(f"{path}: token id {max(by_id)} is beyond the model's vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    pre = _pre_tokenizer(data.get("pre_tokenizer"))
    writer.add_tokenizer_pre((pre_names or {}).get(pre, pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    ids = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    for kind, text in (special_tokens or {}).items():
        if text in ids:
            special._set_special_token(kind, ids[text])
    if not special.chat_template and (folder / "chat_template.jinja").exists():
        special.chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    special.add_to_gguf(writer, quiet=True)

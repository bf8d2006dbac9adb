#!/usr/bin/env python3
"""Train the small byte-level BPE vocabulary that synthetic models carry (rotary_gguf/data/bpe_vocab.json).

Trained with HF `tokenizers` on text found on any Debian machine with Python: the system's licence texts
(prose), a fixed list of standard-library modules (code) and ChatML-formatted turns built from both
(chat). Run once; the output is committed so that synthesis needs no trainer and is reproducible:

    .venv/bin/python scripts/train_vocab.py   (needs the test extras: tokenizers)
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from rotary_gguf.synth.vocab import QWEN2_SPLIT

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LICENCES = ["Apache-2.0", "BSD", "GPL-3", "LGPL-3", "MPL-2.0", "Artistic"]
STDLIB_MODULES = ["json/decoder.py", "argparse.py", "textwrap.py", "heapq.py", "functools.py", "pathlib.py"]
OUT = Path(__file__).resolve().parent.parent / "rotary_gguf" / "data" / "bpe_vocab.json"


def corpus() -> list[str]:
    """Prose, code and chat-formatted text from files every such machine has."""
    texts = []
    for name in LICENCES:
        path = Path("/usr/share/common-licenses") / name
        if path.exists():
            texts.append(path.read_text(errors="replace"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_MODULES:
        texts.append((stdlib / rel).read_text(errors="replace"))
    paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 40]
    chat = [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        for q, a in zip(paragraphs[::2][:400], paragraphs[1::2][:400], strict=False)
    ]
    return texts + chat


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "about": "byte-level BPE trained by scripts/train_vocab.py on local licence texts, stdlib code, chat turns",
        "special_tokens": SPECIAL_TOKENS,
        "tokens": [tok for tok, _ in vocab],
        "merges": merges,
    }, ensure_ascii=False, indent=0) + "\n")
    print(f"wrote {OUT}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()

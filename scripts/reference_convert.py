#!/usr/bin/env python3
"""Run llama.cpp's own convert_hf_to_gguf.py (the reference rotary's converter is checked against) on a
synthetic checkpoint:

    python scripts/reference_convert.py LLAMA_CPP_DIR HF_DIR --outtype f16 --outfile OUT.gguf

LLAMA_CPP_DIR holds convert_hf_to_gguf.py, conversion/ and gguf-py/ (rotary_gguf.plugin_build.
llama_cpp_converter() fetches them). Two hooks concern only the vocabulary: the synthetic tokenizer's
pre-tokenizer is named (its hash is in no list of llama.cpp's), and no sentencepiece model is looked for.
"""

import os
import runpy
import sys

root = sys.argv.pop(1)
sys.path[:0] = [root, os.path.join(root, "gguf-py")]
import conversion.base as base  # noqa: E402  (from the folder just put on the path)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"


def no_sentencepiece(self):
    raise FileNotFoundError("no tokenizer.model")


base.TextModel._create_vocab_sentencepiece = no_sentencepiece
sys.argv[0] = os.path.join(root, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")

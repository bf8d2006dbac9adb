#!/usr/bin/env python3
"""Run llama.cpp's own convert_hf_to_gguf.py (the reference rotary's converter is checked against) on a
synthetic checkpoint:

    python scripts/reference_convert.py LLAMA_CPP_DIR HF_DIR --outtype f16 --outfile OUT.gguf

LLAMA_CPP_DIR holds convert_hf_to_gguf.py, conversion/ and gguf-py/ (rotary_gguf.plugin_build.
llama_cpp_converter() fetches them). The hooks concern only the vocabulary: the synthetic tokenizer's
pre-tokenizer is named (its hash is in no list of llama.cpp's), no sentencepiece model is looked for, and
families whose vocabulary code expects their own special tokens (GLM's [gMASK], Gemma 4's SentencePiece-style
BPE) write the synthetic BPE vocabulary as a plain GPT-2 one instead.
"""

import os
import runpy
import sys

root = sys.argv.pop(1)
sys.path[:0] = [root, os.path.join(root, "gguf-py")]
import conversion.base as base  # noqa: E402  (from the folder just put on the path)
import conversion.gemma as gemma  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"


def no_sentencepiece(self):
    raise FileNotFoundError("no tokenizer.model")


base.TextModel._create_vocab_sentencepiece = no_sentencepiece


def synthetic_bpe(self):
    self._set_vocab_gpt2()


base.TextModel._set_vocab_glm = synthetic_bpe
gemma.Gemma4Model.set_vocab = synthetic_bpe
sys.argv[0] = os.path.join(root, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")

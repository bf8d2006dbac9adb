#!/usr/bin/env python3
"""Turn-2 prompt time on a hybrid model (qwen35moe: Gated DeltaNet layers whose memory cannot drop a
suffix): the engine's prompt checkpoint against a cold re-evaluation of the same conversation.

Writes a small random qwen3_5_moe_text checkpoint with transformers (hidden 256, 8 layers, 32 experts, 4
used), converts it with llama.cpp's own convert_hf_to_gguf.py, then in one process and alternating:
  checkpoint  a chat session's next turn (the engine restores the recurrent state saved at the end of the
              previous prompt and evaluates only the new tokens)
  cold        the same prompt evaluated from an empty context
Prints the prompt times, the tokens each evaluated, and the ratio.

    .venv/bin/python benchmarks/hybrid_turns.py [--rounds 5] [--history 1200] [--dir /tmp/hybrid]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from rotary_gguf.chat import ChatSession
from rotary_gguf.plugin_build import llama_cpp_converter
from rotary_gguf.runtime import Engine, EngineOptions, Sampling
from rotary_gguf.synth.hf import write_hf_checkpoint
from rotary_gguf.synth.vocab import embedded_vocabulary

ROOT = Path(__file__).resolve().parents[1]


def model(folder: Path) -> Path:
    """The benchmark's qwen35moe GGUF (written once into folder)."""
    import torch
    import transformers

    out = folder / "qwen35moe-bench-f16.gguf"
    if out.exists():
        return out
    hf = folder / "hf"
    config = transformers.Qwen3_5MoeTextConfig(
        vocab_size=len(embedded_vocabulary().tokens), hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=32, linear_value_head_dim=32, num_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=128, shared_expert_intermediate_size=128, max_position_embeddings=8192,
        tie_word_embeddings=False)
    config.architectures = ["Qwen3_5MoeForCausalLM"]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(hf)
    write_hf_checkpoint(folder / "tok", "qwen3_moe", dtype="f32")
    for f in (folder / "tok").glob("tokenizer*"):
        shutil.copy(f, hf / f.name)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "reference_convert.py"), str(llama_cpp_converter()),
                    str(hf), "--outtype", "f16", "--no-mtp", "--outfile", str(out)], check=True, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--history", type=int, default=1200, help="approximate tokens of the first user message")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/rotary-hybrid-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = model(args.dir)
    options = EngineOptions(ctx=4096, threads=2)
    long_message = " ".join(f"line {i}: the router sends this token to the experts it prefers." for i in range(
        args.history // 14))
    checkpoint, cold, evaluated = [], [], {"checkpoint": 0, "cold": 0}
    with Engine.open(path, "cpu-only", "experts-on-host", options) as engine, \
            Engine.open(path, "cpu-only", "experts-on-host", options) as fresh:
        for round_ in range(args.rounds):
            session = ChatSession(engine, max_reply_tokens=16, temp=0)
            session.send(long_message + f" (round {round_})", lambda text: None)
            reply = session.send("and what comes next?", lambda text: None)
            checkpoint.append(reply.generation.prompt_seconds)
            evaluated["checkpoint"] = reply.generation.prompt_tokens - reply.generation.cached_tokens
            ids = fresh.tokenize(session.template.render(session.messages[:-1]))
            g = fresh.complete(ids, 16, sampling=Sampling(temp=0))
            cold.append(g.prompt_seconds)
            evaluated["cold"] = g.prompt_tokens - g.cached_tokens
            assert g.text == reply.text  # the checkpoint changes nothing but the time
            session.reset()
    a, b = statistics.median(checkpoint), statistics.median(cold)
    print(f"{path.name}: turn 2 of a {reply.generation.prompt_tokens}-token conversation, {args.rounds} rounds")
    print(f"checkpoint  prompt {a * 1000:8.1f} ms median ({evaluated['checkpoint']} tokens evaluated)")
    print(f"cold        prompt {b * 1000:8.1f} ms median ({evaluated['cold']} tokens evaluated)")
    print(f"ratio cold / checkpoint: {b / a:.1f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Train the small Qwen3-MoE code model that `rotary demo` runs (rotary_gguf/data/models/).

Everything it reads is on every machine of this kind: the Python standard library's own sources and
docstrings (`sysconfig` stdlib path; site-packages and dist-packages excluded, so third-party code
stays held out for evaluation). It trains a byte-level BPE tokenizer on that text (the Qwen2 split, as
scripts/train_vocab.py), then transformers' own Qwen3-MoE model class (`Qwen3MoeForCausalLM`, router
with the load-balancing auxiliary loss) from scratch with the CPU torch, and writes an HF checkpoint:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json (ChatML template), plus
training.json (data, shapes, loss curve, timings).

    .venv/bin/python scripts/train_tiny_moe.py OUT_DIR [--steps N] [--threads N]

then `rotary convert OUT_DIR model.gguf --type q8_0` and `rotary calibrate model.gguf --embed`. Seeded:
the data order, initialisation and batches are fixed by --seed; torch's CPU kernels are deterministic
for a fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from rotary_gguf.synth.vocab import CHAT_TEMPLATE, QWEN2_SPLIT

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Generated tables and data, not code a person wrote: they teach nothing and skew the vocabulary.
SKIPPED = ("encodings", "site-packages", "dist-packages", "__pycache__", "idlelib/idle_test", "test/test_unicode")
HELD_OUT_EVERY = 50  # every 50th file (sorted) is the validation split


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in rel for part in SKIPPED) or path.stat().st_size > 400_000:
            continue
        files.append(path)
    return files


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """One stream: each file's tokens followed by <|endoftext|>."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_model(args: argparse.Namespace, vocab_size: int, tokenizer: Tokenizer) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width,
        intermediate_size=args.expert_width * args.top_k, norm_topk_prob=True, decoder_sparse_step=1,
        output_router_logits=True, router_aux_loss_coef=args.aux_loss, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 100_000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=tokenizer.token_to_id("<|endoftext|>"), eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    return Qwen3MoeForCausalLM(config)


def batches(stream: np.ndarray, seq: int, batch: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(stream) - seq - 1, size=batch)
        yield torch.from_numpy(np.stack([stream[s:s + seq + 1] for s in starts]))


@torch.no_grad()
def validation_loss(model: Qwen3MoeForCausalLM, stream: np.ndarray, seq: int, windows: int) -> float:
    model.eval()
    losses = []
    step = max(1, (len(stream) - seq - 1) // windows)
    for start in range(0, step * windows, step):
        x = torch.from_numpy(stream[start:start + seq + 1][None])
        losses.append(model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.item())
    model.train()
    return float(np.mean(losses))


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-width", type=int, default=128)
    parser.add_argument("--aux-loss", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    files = stdlib_files()
    train_files = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY]
    valid_files = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == 0]
    train_texts, valid_texts = read_texts(train_files), read_texts(valid_files)
    tokenizer = train_tokenizer(train_texts, args.vocab)
    vocab_size = tokenizer.get_vocab_size()
    train_ids, valid_ids = encode(tokenizer, train_texts), encode(tokenizer, valid_texts)
    root = sysconfig.get_paths()["stdlib"]
    print(f"data: {len(train_texts)} training files and {len(valid_texts)} validation files under {root} "
          f"({sum(map(len, train_texts)) / 1e6:.1f} MB); {len(train_ids):,} training tokens, "
          f"{len(valid_ids):,} validation tokens; vocabulary {vocab_size} tokens "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    model = build_model(args, vocab_size, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"model: qwen3_moe, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts "
          f"(top {c.num_experts_per_tok}) of width {c.moe_intermediate_size}: {n_params / 1e6:.1f} M parameters",
          flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = batches(train_ids, args.seq, args.batch, np.random.default_rng(args.seed))
    curve = []
    model.train()
    train_started = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        x = next(data)
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - train_started
            tokens = (step + 1) * args.batch * args.seq
            point = {"step": step, "loss": round(out.loss.item() - args.aux_loss * out.aux_loss.item(), 4),
                     "aux_loss": round(out.aux_loss.item(), 4), "seconds": round(elapsed, 1), "tokens": tokens}
            curve.append(point)
            print(f"step {step:5d}/{args.steps}  loss {point['loss']:.3f}  aux {point['aux_loss']:.3f}  "
                  f"{tokens / elapsed:,.0f} tok/s  {elapsed / 60:.1f} min", flush=True)
    train_seconds = time.perf_counter() - train_started
    valid = validation_loss(model, valid_ids, args.seq, windows=64)
    print(f"validation loss {valid:.3f} (perplexity {math.exp(valid):.1f}) on held-out stdlib files", flush=True)

    model.save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)
    report = {
        "data": {"stdlib": root, "train_files": len(train_texts), "validation_files": len(valid_texts),
                 "train_tokens": int(len(train_ids)), "validation_tokens": int(len(valid_ids)),
                 "skipped": list(SKIPPED), "held_out_every": HELD_OUT_EVERY},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": n_params, "train_seconds": round(train_seconds, 1),
        "tokens_seen": args.steps * args.batch * args.seq, "validation_loss": round(valid, 4),
        "torch": torch.__version__, "curve": curve,
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How well layer l's MoE input predicts layer l+1's experts, on a trained Qwen3-MoE checkpoint.

    .venv/bin/python benchmarks/router_prediction.py CHECKPOINT_DIR [--tokens N] [--out FILE.json]

While layer l's experts compute, the residual stream entering layer l's MoE block is known. Applying
layer l+1's own MoE norm and router to it predicts layer l+1's top-k before layer l+1 runs. This script
runs the checkpoint with transformers on held-out code (click and numpy/lib sources, as
benchmarks/tiny_moe_quality.py), and reports per layer the recall of that prediction (the share of
layer l+1's selected experts among the predicted top-k, and among the top-2k), against two history-only
guesses: the same layer's experts of the previous token, and the layer's most popular experts so far.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from tiny_moe_quality import held_out_files  # noqa: E402


def held_out_ids(tokenizer, n_tokens: int) -> list[int]:
    _, files = held_out_files()
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]


def capture(model, ids: list[int], window: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the residual entering the MoE block (after attention) and the router's top-k, every token."""
    layers = model.model.layers
    mids: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda mod, args, out, i=i: mids[i].append(args[0][0].detach())) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), window):
                model(input_ids=torch.tensor([ids[start:start + window]]))
    finally:
        for h in hooks:
            h.remove()
    residual = [torch.cat(m) for m in mids]
    k = model.config.num_experts_per_tok
    chosen = [route(layer, r, k) for layer, r in zip(layers, residual, strict=True)]
    return residual, chosen


def route(layer, residual: torch.Tensor, k: int) -> torch.Tensor:
    """The experts this layer's router picks for these residual-stream rows (top-k of its logits)."""
    logits = layer.mlp.gate(layer.post_attention_layernorm(residual))
    logits = logits[0] if isinstance(logits, tuple) else logits
    return torch.topk(logits, k, dim=-1).indices


def recall(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    hits = (predicted[:, :, None] == actual[:, None, :]).any(dim=1).float()
    return float(hits.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "router_prediction.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    k, n_expert = model.config.num_experts_per_tok, model.config.num_experts
    ids = held_out_ids(tokenizer, args.tokens)
    residual, chosen = capture(model, ids, args.window)
    layers = model.model.layers
    rows = []
    print(f"{len(ids)} held-out tokens, top-{k} of {n_expert} experts; recall of layer l+1's experts:")
    print(f"{'layer':>5} {'router top-k':>12} {'router top-2k':>13} {'previous token':>14} {'popular so far':>14}")
    for i in range(1, len(layers)):
        with torch.no_grad():
            logits = layers[i].mlp.gate(layers[i].post_attention_layernorm(residual[i - 1]))
            logits = logits[0] if isinstance(logits, tuple) else logits
        actual = chosen[i]
        top_k = torch.topk(logits, k, dim=-1).indices
        top_2k = torch.topk(logits, 2 * k, dim=-1).indices
        previous = torch.cat([actual[:1], actual[:-1]])
        counts = torch.zeros(len(actual), n_expert)
        counts.scatter_add_(1, actual, torch.ones_like(actual, dtype=torch.float))
        running = torch.cumsum(counts, 0) - counts  # selections before each token
        popular = torch.topk(running + 1e-6 * torch.arange(n_expert), k, dim=-1).indices
        row = {"layer": i, "router_top_k": recall(top_k, actual), "router_top_2k": recall(top_2k, actual),
               "previous_token": recall(previous, actual), "popular_so_far": recall(popular, actual)}
        rows.append(row)
        print(f"{i:>5} {row['router_top_k']:>12.1%} {row['router_top_2k']:>13.1%} {row['previous_token']:>14.1%} "
              f"{row['popular_so_far']:>14.1%}")
    mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if key != "layer"}
    print("mean  " + "  ".join(f"{key} {v:.1%}" for key, v in mean.items()))
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "tokens": len(ids), "top_k": k,
                                    "n_expert": n_expert, "layers": rows, "mean": mean}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

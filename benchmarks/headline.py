#!/usr/bin/env python3
"""The headline benchmark: rotary against tuned stock llama.cpp placements at one VRAM budget, one process.

Placements, each loaded afresh and run with the same prompt and decode length:
  experts-on-host             every routed expert on the CPU (llama.cpp --cpu-moe)
  layer-fill first/last       the planner's whole expert layers in VRAM, first or last layers first
  layer-fill -k               k fewer GPU expert layers than fit (the --n-cpu-moe values around the best)
  rotary (own routing)        the scheduler plugin's slots, the model's own router
  rotary (replayed trace)     the same, with the routing of a trace whose locality matches published
                              measurements substituted for the router's (bench only: outputs are not
                              the model's; random-weight synth models route almost uniformly)
Every variant runs --repetitions times, interleaved with the others as `rotary bench` does (mean and
standard deviation reported). Writes OUT/headline.json (every `rotary bench --json` placement, labelled, with
the budget, the device and the command) and OUT/headline.md.

    .venv/bin/python benchmarks/headline.py --model M.gguf --budget 6.5GiB --threads 8 --ctx 4096 \\
        --prompt-tokens 512 --tokens 256 --trace T.rtrc --repetitions 3 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from dataclasses import replace
from pathlib import Path

from rotary_gguf import runtime
from rotary_gguf.bench import BenchSpec, measure_interleaved
from rotary_gguf.plan import plan_placement
from rotary_gguf.profile import load_profile, parse_size
from rotary_gguf.report import format_mean_sd
from rotary_gguf.runtime import EngineOptions, ModelSetup, prepare


def variants(setup: ModelSetup, sweep: int, trace: Path | None) -> list[tuple[str, ModelSetup]]:
    """(label, setup) of every run: the planner's placements and the --n-cpu-moe values around the best."""
    def plan(**kw) -> ModelSetup:
        placement = plan_placement(setup.index, setup.profile, vram_budget=setup.options.vram_budget,
                                   ctx=setup.options.ctx, **kw)
        return replace(setup, placement=placement)

    best = plan(strategy="layer-fill")
    runs = [("experts-on-host", plan(strategy="experts-on-host")), ("layer-fill first", best),
            ("layer-fill last", plan(strategy="layer-fill", layer_order="last"))]
    for k in range(1, sweep + 1):
        fewer = len(best.placement.gpu_expert_layers) - k
        if fewer >= 0:
            runs.append((f"layer-fill first -{k}", plan(strategy="layer-fill", max_expert_layers=fewer)))
    if runtime.rotary_unavailable() is None:
        rotary = prepare(setup.index.path, setup.profile, "rotary", setup.options)
        runs.append(("rotary (own routing)", rotary))
        if trace:
            runs.append((f"rotary (replayed {trace.name})", replace(rotary, options=replace(rotary.options,
                                                                                              replay=trace))))
    return runs


def markdown(result: dict) -> str:
    lines = [f"# rotary headline benchmark, {result['date']}", "",
             f"- device: {result['device']}; CPU: {result['cpu']}", f"- model: {result['model']}",
             f"- VRAM budget {result['vram_budget_bytes'] / 2**30:.2f} GiB, {result['threads']} threads, "
             f"ctx {result['ctx']}, {result['prompt_tokens']} prompt + {result['decode_tokens']} decoded tokens, "
             f"{result['repetitions']} interleaved repetitions (mean ± sd)",
             f"- command: `{result['command']}`", "",
             "| placement | routing | prompt tok/s | decode tok/s | peak VRAM GiB | hit rate | MiB copied/token |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in result["placements"]:
        rotary = p.get("rotary") or {}
        vram = f"{p['peak_vram_bytes'] / 2**30:.2f}" if p.get("peak_vram_bytes") else "-"
        hit = f"{rotary['hit_rate']:.1%}" if rotary else "-"
        copied = f"{rotary['bytes_copied_per_token'] / 2**20:.1f}" if rotary else "-"
        lines.append(f"| {p['label']} | {rotary.get('routing', 'the model' + chr(39) + 's own')} | "
                     f"{format_mean_sd(p['prompt_tok_s'])} | {format_mean_sd(p['decode_tok_s'])} | {vram} | "
                     f"{hit} | {copied} |")
    lines += ["", f"Best stock placement: {result['best_stock']} ({result['best_stock_decode_tok_s']:.1f} tok/s); "
              + "; ".join(f"{k}: {v:.2f}x" for k, v in result["rotary_vs_best_stock"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--profile", default="rtx4060-laptop-8gb")
    parser.add_argument("--budget", default="6.5GiB")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sweep", type=int, default=2, help="layer-fill runs with 1..N fewer expert layers")
    parser.add_argument("--trace", type=Path, default=None, help="routing to replay in a second rotary run")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    options = EngineOptions(ctx=args.ctx, threads=args.threads, vram_budget=parse_size(args.budget))
    base = prepare(args.model, load_profile(args.profile), "layer-fill", options)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = BenchSpec((), args.prompt_tokens, args.tokens, args.repetitions)
    results, _ = measure_interleaved(variants(base, args.sweep, args.trace), spec,
                                     lambda done, total, name: print(f"[{done}/{total}] {name}", file=sys.stderr,
                                                                     flush=True))
    placements = [r.to_json() | {"label": r.name} for r in results]
    stock = [p for p in placements if not p["label"].startswith("rotary")]
    best = max(stock, key=lambda p: p["decode_tok_s"]["mean"])
    best_rate = best["decode_tok_s"]["mean"]
    result = {
        "date": datetime.date.today().isoformat(), "device": runtime.gpu_device_name() or "none (CPU build)",
        "rotary_device": runtime.scheduler_plugin().description if runtime.rotary_unavailable() is None else None,
        "cpu": platform.processor() or platform.machine(), "model": args.model.name, "profile": base.profile.name,
        "vram_budget_bytes": options.vram_budget, "repetitions": args.repetitions, "threads": args.threads,
        "ctx": args.ctx, "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.tokens, "command": " ".join(sys.argv), "placements": placements,
        "best_stock": best["label"], "best_stock_decode_tok_s": best["decode_tok_s"]["mean"],
        "rotary_vs_best_stock": {p["label"]: p["decode_tok_s"]["mean"] / best_rate
                                 for p in placements if p["label"].startswith("rotary") and best_rate},
    }
    (args.out / "headline.json").write_text(json.dumps(result, indent=1))
    (args.out / "headline.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

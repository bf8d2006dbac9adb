#!/usr/bin/env python3
"""Build the shipped model (rotary_gguf/data/models/) from a checkpoint of scripts/train_tiny_moe.py.

    .venv/bin/python scripts/build_tiny_moe.py CHECKPOINT_DIR [--type q8_0]
    .venv/bin/python scripts/build_tiny_moe.py --traces-only   # re-record the two traces from the shipped model

Runs the commands a user would: `rotary convert` to GGUF, then `rotary calibrate --embed` on code
prompts (the opening lines of the standard-library files the training held out), which also records
the routing trace (benchmarks/traces/stdlib-moe.rtrc) and the popularity heatmap (benchmarks/). A
second routing trace, for rotation studies, comes from third-party code the model never saw (the
opening lines of click's sources, 128 generated tokens each: benchmarks/traces/stdlib-moe-click.rtrc).
Both traces carry the plugin's cross-layer predictions beside the routing (trace format 2). Copies the
training report and writes the licence note beside the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from train_tiny_moe import HELD_OUT_EVERY, stdlib_files  # noqa: E402

from rotary_gguf.demo import SHIPPED_MODEL  # noqa: E402

ROTARY = str(Path(sys.executable).with_name("rotary"))
PROMPT_LINES = 40


def opening_lines(files: list[Path], out: Path) -> Path:
    """The first lines of each file, as a JSON list of prompts."""
    prompts = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[:PROMPT_LINES]
        if sum(map(len, lines)) > 200:
            prompts.append("".join(lines))
    out.write_text(json.dumps(prompts, indent=1) + "\n")
    return out


def licence_note(checkpoint: Path) -> str:
    report = json.loads((checkpoint / "training.json").read_text())
    data, args = report["data"], report["args"]
    return f"""{SHIPPED_MODEL.name}

A {report['parameters'] / 1e6:.1f} M-parameter Qwen3-MoE language model ({args['layers']} layers, hidden
{args['hidden']}, {args['experts']} routed experts of which {args['top_k']} are used per token, width
{args['expert_width']}), trained from random initialisation by scripts/train_tiny_moe.py (seed {args['seed']},
{report['tokens_seen']:,} tokens seen, {report['train_seconds'] / 60:.0f} min on 2 CPU cores) on the
source files of the Python {sys.version.split()[0]} standard library ({data['train_files']} files,
{data['train_tokens']:,} tokens; every {data['held_out_every']}th file held out), with a byte-level BPE
vocabulary of {args['vocab']} tokens trained on the same text. Converted with `rotary convert` and
calibrated with `rotary calibrate --embed` (scripts/build_tiny_moe.py).

The training text is the Python standard library, distributed under the Python Software Foundation
License; its text is in PSF-LICENSE.txt beside this file. The model is a statistical summary of that
text and may reproduce fragments of it.
"""


def run(*args: str) -> None:
    print("$ rotary " + " ".join(args), flush=True)
    subprocess.run([ROTARY, *args], check=True)


TRACE = ROOT / "benchmarks" / "traces" / "stdlib-moe.rtrc"
CLICK_TRACE = ROOT / "benchmarks" / "traces" / "stdlib-moe-click.rtrc"


def held_out_prompts(tmp: Path) -> Path:
    held_out = [f for i, f in enumerate(stdlib_files()) if i % HELD_OUT_EVERY == 0]
    return opening_lines(held_out, tmp / "prompts.json")


def record_click_trace(tmp: Path) -> None:
    click_sources = sorted((Path(click.__file__).parent).glob("*.py"))
    run("calibrate", str(SHIPPED_MODEL), "--prompts", str(opening_lines(click_sources, tmp / "click.json")),
        "--tokens", "128", "--profile", "cpu-only", "--out", str(tmp / "click.rotary.json"),
        "--trace", str(CLICK_TRACE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?")
    parser.add_argument("--type", default="q8_0", help="the GGUF type: q8_0 or a llama.cpp type (q4_k_m)")
    parser.add_argument("--traces-only", action="store_true", help="only re-record the traces (shipped model)")
    args = parser.parse_args()
    if args.traces_only:
        with tempfile.TemporaryDirectory() as tmp:
            run("calibrate", str(SHIPPED_MODEL), "--prompts", str(held_out_prompts(Path(tmp))), "--profile",
                "cpu-only", "--out", str(Path(tmp) / "stdlib.rotary.json"), "--trace", str(TRACE))
            record_click_trace(Path(tmp))
        return 0
    if args.checkpoint is None:
        parser.error("give the checkpoint folder (or --traces-only)")
    out_dir = SHIPPED_MODEL.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / SHIPPED_MODEL.name
        run("convert", str(args.checkpoint), "-o", str(plain), "--type", args.type)
        run("calibrate", str(plain), "--prompts", str(held_out_prompts(Path(tmp))), "--profile", "cpu-only", "--embed",
            "-o", str(SHIPPED_MODEL), "--force", "--trace", str(TRACE),
            "--plot", str(ROOT / "benchmarks" / "stdlib-moe-heatmap.png"))
        record_click_trace(Path(tmp))
    shutil.copyfile(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", out_dir / "PSF-LICENSE.txt")
    shutil.copyfile(args.checkpoint / "training.json", out_dir / "training.json")
    (out_dir / "README.txt").write_text(licence_note(args.checkpoint))
    print(f"wrote {SHIPPED_MODEL} ({SHIPPED_MODEL.stat().st_size / 1e6:.1f} MB) and its notes in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Conversion wall time and peak RSS: `rotary convert` against llama.cpp's convert_hf_to_gguf.py --outtype f16,
on the same synthetic qwen3_moe bf16 checkpoint, each run in a child process, one after the other.

    .venv/bin/python benchmarks/convert_speed.py [--dir /tmp/convert-bench] [--layers 6]

The checkpoint (hidden 1024, 64 experts of 512, 6 layers: ~1.2 GB of bf16) is written first unless present.
The reference converter comes from the llama-cpp-python 0.3.36 sdist (downloaded once and cached) and needs
torch and transformers; it runs through scripts/reference_convert.py (vocabulary hooks only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from rotary_gguf.plugin_build import llama_cpp_converter
from rotary_gguf.synth.hf import write_hf_checkpoint

SHAPES = dict(hidden=1024, heads=16, kv_heads=4, head_dim=64, experts=64, top_k=8, ff=512)
REFERENCE = Path(__file__).resolve().parents[1] / "scripts" / "reference_convert.py"


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of a child process, its RSS sampled every 20 ms (the kernel's
    ru_maxrss would count the parent's image the child had before exec)."""
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    if child.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{child.stderr.read().decode()[-2000:]}")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert-bench"))
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    hf = args.dir / "hf"
    if not (hf / "config.json").exists():
        print("writing the checkpoint", file=sys.stderr)
        write_hf_checkpoint(hf, "qwen3_moe", dtype="bf16", shards=4, shapes={**SHAPES, "layers": args.layers})
    size = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    root = llama_cpp_converter(lambda text: print(text, file=sys.stderr))
    ours = measure([sys.executable, "-m", "rotary_gguf", "convert", str(hf), "-o", str(args.dir / "ours.gguf"),
                    "--type", "f16", "--force"])
    theirs = measure([sys.executable, str(REFERENCE), str(root), str(hf), "--outtype", "f16",
                      "--outfile", str(args.dir / "reference.gguf")])
    print(f"checkpoint: qwen3_moe bf16, {size / 2**30:.2f} GiB in 4 shards; output f16")
    for name, (seconds, rss) in (("rotary convert", ours), ("convert_hf_to_gguf.py", theirs)):
        print(f"{name:<22} {seconds:7.1f} s   peak RSS {rss / 2**30:6.2f} GiB")
    print(f"rotary / reference: {theirs[0] / ours[0]:.2f}x faster, {ours[1] / theirs[1]:.2f}x the peak RSS")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Index time of a 17 GB GGUF with the real Qwen3-30B-A3B shapes (151,936-token vocabulary).

Writes the qwen3-30b-a3b synth preset as a sparse file (header only; the data is a hole), then times
rotary's open_index against gguf-py's plain GGUFReader on the same file, in this process.

    .venv/bin/python benchmarks/index_speed.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader

from rotary_gguf.gguf import open_index
from rotary_gguf.synth import PRESETS, synth_model


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3-30b-a3b-sparse.gguf"
        synth_model(path, PRESETS["qwen3-30b-a3b"], "q4_k", sparse=True)
        index = open_index(path)
        print(f"file: {path.stat().st_size / 1e9:.1f} GB (sparse), {len(index.tensors)} tensors, "
              f"{len(index.experts)} expert blocks, vocab {index.params.n_vocab}")
        ours = _median_seconds(lambda: open_index(path), args.repeat)
        plain = _median_seconds(lambda: GGUFReader(path), max(1, args.repeat // 2))
        print(f"rotary open_index:   {ours * 1000:8.1f} ms (median of {args.repeat})")
        print(f"gguf-py GGUFReader:  {plain * 1000:8.1f} ms (baseline, same file, same process)")
        print(f"ratio (baseline / rotary): {plain / ours:.1f}x")


if __name__ == "__main__":
    main()

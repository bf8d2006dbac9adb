#!/usr/bin/env python3
"""Time `synth` per preset at its default type, writing into a temporary folder (or --dir).

    .venv/bin/python benchmarks/synth_speed.py [--presets tiny small qwen3-30b-a3b] [--dir DIR]

qwen3-30b-a3b writes about 17 GB: give --dir a disk with room.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rotary_gguf.synth import PRESET_DEFAULT_TYPE, PRESETS, synth_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for preset in args.presets:
            qtype = PRESET_DEFAULT_TYPE[preset]
            result = synth_model(Path(tmp) / f"{preset}.gguf", PRESETS[preset], qtype)
            rate = result.nbytes / 1e6 / result.seconds
            print(f"{preset:<15} {qtype:<5} {result.nbytes / 1e6:10.1f} MB  {result.seconds:7.2f} s  {rate:7.0f} MB/s")
            result.path.unlink()


if __name__ == "__main__":
    main()

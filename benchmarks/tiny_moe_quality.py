#!/usr/bin/env python3
"""Quality of the shipped model: perplexity on held-out Python code against two baselines, and its routing.

    .venv/bin/python benchmarks/tiny_moe_quality.py [--ctx 512] [--checkpoint DIR] [--out FILE.json]

Held-out text: the sources of click and of numpy/lib in this virtual environment (third-party code; the
model was trained on the standard library only). Every model is scored by the same `rotary perplexity`:
- the shipped model (and, with --checkpoint, the same checkpoint converted to q4_k_m);
- random: the shipped model's file with every weight redrawn as the training's initialisation (normal,
  std 0.02; norms one), same tokenizer and shapes;
- unigram: the shipped model's file rewritten so that its logits are the log frequencies of the training
  tokens (add-one smoothed) whatever the input: every token embeds as the all-ones vector, attention and
  expert outputs are zero, and the output head's row for token t is log p(t) / n_embd.
Routing: the embedded calibration's per-layer statistics, and hit rates on the routing trace recorded
with it (benchmarks/traces/stdlib-moe.rtrc): classic LRU (the published figures' measure) and
`rotary simulate`'s policies under the rtx4060-laptop-8gb copy budget, at 1/8 and 1/4 of the experts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from train_tiny_moe import HELD_OUT_EVERY, read_texts, stdlib_files  # noqa: E402

from rotary_gguf.calibration import calibration_from_metadata, routing_summary  # noqa: E402
from rotary_gguf.demo import SHIPPED_MODEL  # noqa: E402
from rotary_gguf.embed import copy_metadata  # noqa: E402
from rotary_gguf.gguf import open_index  # noqa: E402
from rotary_gguf.profile import load_profile  # noqa: E402
from rotary_gguf.simulate import simulate_policies  # noqa: E402
from rotary_gguf.trace import lru_reference_hit_rate, read_trace  # noqa: E402

ROTARY = str(Path(sys.executable).with_name("rotary"))
TRACE = ROOT / "benchmarks" / "traces" / "stdlib-moe.rtrc"
HELD_OUT_PACKAGES = ("click", "numpy/lib")


def held_out_files() -> tuple[Path, list[Path]]:
    """site-packages, and the held-out third-party sources in it (sorted)."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    return site, sorted(f for pkg in HELD_OUT_PACKAGES for f in (site / pkg).glob("*.py"))


def held_out_text(out: Path) -> tuple[Path, list[str]]:
    site, files = held_out_files()
    out.write_text("\n\n".join(f.read_text(encoding="utf-8") for f in files))
    return out, [f.relative_to(site).as_posix() for f in files]


def training_unigram(n_vocab: int) -> np.ndarray:
    """Add-one smoothed frequencies of the training tokens, tokenized by the shipped model's vocabulary."""
    import llama_cpp

    files = [f for i, f in enumerate(stdlib_files()) if i % HELD_OUT_EVERY]
    llm = llama_cpp.Llama(str(SHIPPED_MODEL), vocab_only=True, verbose=False)
    counts = np.ones(n_vocab, np.float64)
    for text in read_texts(files):
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        counts += np.bincount(ids, minlength=n_vocab)[:n_vocab]
    return counts / counts.sum()


def rewrite(out: Path, replace) -> Path:
    """The shipped model's file with tensors replaced: replace(name, ggml shape) -> float32 array or None."""
    reader = gguf.GGUFReader(SHIPPED_MODEL)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(out, arch)
    copy_metadata(reader, writer, skip=("rotary.",))
    tensors = []
    for t in reader.tensors:
        new = replace(t.name, tuple(int(x) for x in t.shape))
        tensors.append((t, new))
        if new is None:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        else:
            writer.add_tensor_info(t.name, new.shape, new.dtype, new.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, new in tensors:
        writer.write_tensor_data(t.data if new is None else new)
    writer.close()
    return out


def random_model(out: Path) -> Path:
    rng = np.random.default_rng(0)

    def replace(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(shape[::-1], np.float32)
        return (rng.standard_normal(shape[::-1], dtype=np.float32) * 0.02).astype(np.float32)

    return rewrite(out, replace)


def unigram_model(out: Path, unigram: np.ndarray) -> Path:
    def replace(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if name == "token_embd.weight" or name.endswith("norm.weight"):
            return np.ones(shape[::-1], np.float32)
        if name.endswith(("attn_output.weight", "ffn_down_exps.weight")):
            return np.zeros(shape[::-1], np.float32)
        if name == "output.weight":
            n_embd, n_vocab = shape
            return np.repeat((np.log(unigram[:n_vocab]) / n_embd)[:, None], n_embd, axis=1).astype(np.float32)
        return None

    return rewrite(out, replace)


def perplexity(model: Path, text: Path, ctx: int) -> dict:
    print(f"$ rotary perplexity {model.name} {text.name} --ctx {ctx} --profile cpu-only --json", flush=True)
    done = subprocess.run([ROTARY, "perplexity", str(model), str(text), "--ctx", str(ctx), "--profile", "cpu-only",
                           "--json"], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def routing() -> dict:
    index = open_index(SHIPPED_MODEL)
    calibration = calibration_from_metadata(index)
    layers = calibration.routing()
    print(routing_summary(layers))
    trace = read_trace(TRACE)
    profile = load_profile("rtx4060-laptop-8gb")
    n = trace.header.n_expert
    hit_rates = {}
    for fraction in (8, 4, 2):
        slots = n // fraction
        row = {"lru_reference": lru_reference_hit_rate(trace, slots)}
        row |= {r.policy: r.hit_rate for r in simulate_policies(trace, slots, ["lru", "lfu", "hybrid"], profile)}
        hit_rates[f"1/{fraction}"] = {k: round(v, 4) for k, v in row.items()}
        print(f"slots 1/{fraction} ({slots}): " + ", ".join(f"{k} {v:.1%}" for k, v in row.items()))
    return {"calibration": calibration.description, "decode_tokens": trace.decode_steps,
            "layers": [{"layer": r.layer, "entropy_bits": round(r.entropy_bits, 3),
                        "uniform_bits": round(r.uniform_bits, 3), "top_eighth_share": round(r.top_eighth_share, 4),
                        "top_quarter_share": round(r.top_quarter_share, 4)} for r in layers],
            "hit_rates": hit_rates}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--checkpoint", type=Path, default=None, help="also score this checkpoint as q4_k_m")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "tiny_moe_quality.json")
    args = parser.parse_args()
    os.environ.setdefault("ROTARY_CACHE", tempfile.mkdtemp(prefix="rotary-cache-"))
    results: dict = {"model": SHIPPED_MODEL.name, "ctx": args.ctx}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text, files = held_out_text(tmp / "held-out.py.txt")
        results["held_out"] = {"files": files, "characters": len(text.read_text())}
        n_vocab = open_index(SHIPPED_MODEL).params.n_vocab
        models = {"shipped q8_0": SHIPPED_MODEL, "random weights": random_model(tmp / "random.gguf"),
                  "unigram": unigram_model(tmp / "unigram.gguf", training_unigram(n_vocab))}
        if args.checkpoint:
            q4 = tmp / "q4_k_m.gguf"
            subprocess.run([ROTARY, "convert", str(args.checkpoint), "-o", str(q4), "--type", "q4_k_m"], check=True)
            models["checkpoint q4_k_m"] = q4
        results["perplexity"] = {}
        for name, path in models.items():
            got = perplexity(path, text, args.ctx)
            keep = ("ppl", "ppl_stderr", "scored_tokens", "tokens_per_second")
            results["perplexity"][name] = {k: got[k] for k in keep}
            print(f"{name:>18}: PPL {got['ppl']:.2f} +/- {got['ppl_stderr']:.2f} "
                  f"({got['scored_tokens']} tokens, {got['tokens_per_second']:.0f} tok/s)", flush=True)
    results["routing"] = routing()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

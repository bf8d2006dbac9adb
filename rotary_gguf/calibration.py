"""Routing calibration data: per-layer expert selection counts, their sidecar file (`MODEL.rotary.json`)
and the `rotary.*` GGUF metadata of rotary-aware GGUFs. Collecting the counts (which runs a model) is
rotary_gguf.calibrate; this module only holds and reads them.

A sidecar records the model file's size and header checksum, so that one left beside a changed model is
detected. Metadata keys: rotary.format_version (u32); rotary.calibration.description (string);
rotary.calibration.prompts, .prompt_tokens, .generated_tokens (u32); rotary.calibration.prompt_counts.N and
rotary.calibration.generated_counts.N (u32 arrays, one entry per expert) for every MoE layer N.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex

SIDECAR_FORMAT = "rotary-calibration"
SIDECAR_VERSION = 1
METADATA_FORMAT_VERSION = 1


class CalibrationError(RotaryError):
    """Calibration cannot run, or a sidecar does not belong to its model."""


@dataclass(frozen=True)
class LayerRouting:
    """One layer's routing concentration: entropy of its expert popularity (bits; uniform routing has
    log2 of the expert count), and the share of selections taken by its most popular eighth and quarter."""

    layer: int
    entropy_bits: float
    uniform_bits: float
    top_eighth_share: float
    top_quarter_share: float


def routing_summary(layers: list[LayerRouting]) -> str:
    """One line: each statistic's mean over the layers and its range."""
    def stat(values: list[float], fmt: str) -> str:
        return f"{fmt.format(np.mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    return (f"routing entropy {stat([r.entropy_bits for r in layers], '{:.2f}')} bits of "
            f"{layers[0].uniform_bits:.2f} for uniform; the top 1/8 of experts take "
            f"{stat([100 * r.top_eighth_share for r in layers], '{:.0f}%')}, the top 1/4 "
            f"{stat([100 * r.top_quarter_share for r in layers], '{:.0f}%')} of selections (mean over "
            f"{len(layers)} layers, range)")


@dataclass(frozen=True)
class Calibration:
    """Per-layer expert selection counts over a calibration set."""

    model_file: str
    model_size: int
    header_sha256: str
    description: str
    prompts: int
    prompt_tokens: int
    generated_tokens: int
    prompt_counts: dict[int, tuple[int, ...]]
    generated_counts: dict[int, tuple[int, ...]]

    def popularity(self) -> dict[int, np.ndarray]:
        """Each layer's share of selections per expert (prompt and generated tokens together)."""
        out = {}
        for layer, counts in self.prompt_counts.items():
            total = np.asarray(counts, float) + np.asarray(self.generated_counts.get(layer, counts), float)
            out[layer] = total / total.sum() if total.sum() else np.full(len(total), 1 / len(total))
        return out

    def routing(self) -> list[LayerRouting]:
        """How concentrated each layer's routing is (prompt and generated tokens together)."""
        out = []
        for layer, share in sorted(self.popularity().items()):
            ranked = np.sort(share)[::-1]
            nonzero = share[share > 0]
            n = len(share)
            out.append(LayerRouting(layer, max(0.0, float(-(nonzero * np.log2(nonzero)).sum())), float(np.log2(n)),
                                    float(ranked[:max(1, n // 8)].sum()), float(ranked[:max(1, n // 4)].sum())))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
                "model": {"file": self.model_file, "size": self.model_size, "header_sha256": self.header_sha256},
                "calibration": {"description": self.description, "prompts": self.prompts,
                                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens},
                "layers": {str(layer): {"prompt": list(self.prompt_counts[layer]),
                                        "generated": list(self.generated_counts[layer])}
                           for layer in sorted(self.prompt_counts)}}


def header_checksum(index: ModelIndex) -> str:
    """SHA-256 of the first file's bytes before its tensor data (header, metadata, tensor infos)."""
    first = [t.offset for t in index.tensors if t.file == 0]
    end = min(first) if first else index.path.stat().st_size
    digest = hashlib.sha256()
    with open(index.files[0] if index.files else index.path, "rb") as f:
        while end > 0:
            chunk = f.read(min(end, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            end -= len(chunk)
    return digest.hexdigest()


def sidecar_path(model: Path) -> Path:
    return model.with_name(model.name + ".rotary.json")


def write_sidecar(calibration: Calibration, out: Path) -> Path:
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(calibration.to_json(), indent=1))
    os.replace(part, out)
    return out


def read_sidecar(path: Path, index: ModelIndex | None = None) -> Calibration:
    """A sidecar, checked against the model when given (size and header checksum)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != SIDECAR_FORMAT or data.get("version") != SIDECAR_VERSION:
            raise CalibrationError(f"{path}: not a rotary calibration sidecar (version {SIDECAR_VERSION})")
        layers = {int(k): v for k, v in data["layers"].items()}
        cal = Calibration(data["model"]["file"], int(data["model"]["size"]), data["model"]["header_sha256"],
                          data["calibration"]["description"], int(data["calibration"]["prompts"]),
                          int(data["calibration"]["prompt_tokens"]), int(data["calibration"]["generated_tokens"]),
                          {k: tuple(map(int, v["prompt"])) for k, v in layers.items()},
                          {k: tuple(map(int, v["generated"])) for k, v in layers.items()})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CalibrationError(f"{path}: unreadable calibration sidecar ({type(exc).__name__}: {exc})") from None
    if index is not None and (cal.model_size != index.file_size or cal.header_sha256 != header_checksum(index)):
        raise CalibrationError(f"{path}: stale calibration: it was made for another version of {cal.model_file} "
                               "(size or header checksum differ); run `rotary calibrate` again")
    return cal


def calibration_from_metadata(index: ModelIndex) -> Calibration | None:
    """The calibration a rotary-aware GGUF carries, or None for any other GGUF."""
    meta = index.metadata
    if meta.get("rotary.format_version") is None:
        return None
    layers = sorted(int(k.rsplit(".", 1)[1]) for k in meta if k.startswith("rotary.calibration.prompt_counts."))

    def counts(phase: str) -> dict[int, tuple[int, ...]]:
        return {layer: tuple(int(x) for x in meta[f"rotary.calibration.{phase}_counts.{layer}"]) for layer in layers}

    return Calibration(index.path.name, index.file_size, "", str(meta.get("rotary.calibration.description", "")),
                       int(meta.get("rotary.calibration.prompts", 0)),
                       int(meta.get("rotary.calibration.prompt_tokens", 0)),
                       int(meta.get("rotary.calibration.generated_tokens", 0)), counts("prompt"), counts("generated"))


def load_calibration(index: ModelIndex) -> tuple[Calibration | None, str]:
    """The model's calibration and where it came from: the GGUF's own rotary.* metadata, else a sidecar
    MODEL.rotary.json that matches the file; (None, why) when there is none or the sidecar is stale."""
    embedded = calibration_from_metadata(index)
    if embedded is not None:
        return embedded, "rotary.* metadata"
    sidecar = sidecar_path(index.path)
    if not sidecar.exists():
        return None, "none (run `rotary calibrate`)"
    try:
        return read_sidecar(sidecar, index), sidecar.name
    except RotaryError as exc:
        return None, str(exc)

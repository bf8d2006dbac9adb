"""Rotary-aware GGUF: any GGUF, copied with its calibration as `rotary.*` metadata and its tensor data aligned
to 4096 bytes (so expert slices copy from page-aligned memory). Stock llama.cpp loads it unchanged.

Keys: rotary.format_version (u32); rotary.calibration.description (string); rotary.calibration.prompts,
.prompt_tokens, .generated_tokens (u32); rotary.calibration.prompt_counts.N and
rotary.calibration.generated_counts.N (u32 arrays, one entry per expert) for every MoE layer N.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from rotary_gguf.calibrate import Calibration, read_sidecar, sidecar_path
from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex

FORMAT_VERSION = 1
ALIGNMENT = 4096
PREFIX = "rotary."


class EmbedError(RotaryError):
    """The rotary-aware GGUF cannot be written."""


def _metadata(calibration: Calibration) -> list[tuple[str, object, gguf.GGUFValueType]]:
    u32, s = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
    items = [("rotary.format_version", FORMAT_VERSION, u32),
             ("rotary.calibration.description", calibration.description, s),
             ("rotary.calibration.prompts", calibration.prompts, u32),
             ("rotary.calibration.prompt_tokens", calibration.prompt_tokens, u32),
             ("rotary.calibration.generated_tokens", calibration.generated_tokens, u32)]
    for layer in sorted(calibration.prompt_counts):
        for phase, counts in (("prompt", calibration.prompt_counts), ("generated", calibration.generated_counts)):
            items.append((f"rotary.calibration.{phase}_counts.{layer}",
                          np.minimum(np.asarray(counts[layer], np.uint64), 2**32 - 1).astype(np.uint32).tolist(),
                          gguf.GGUFValueType.ARRAY))
    return items


def embed(index: ModelIndex, calibration: Calibration, out: Path, *, force: bool = False,
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Write OUT: index's GGUF with the calibration embedded; temp file + rename, nothing left on failure."""
    if len(index.files) > 1:
        raise EmbedError(f"{index.path}: split GGUFs are not supported for embedding; merge them first")
    if out.exists() and not force:
        raise EmbedError(f"{out} exists; use --force to overwrite")
    if out.resolve() == index.path.resolve():
        raise EmbedError(f"{out}: the output must not be the input model")
    reader = gguf.GGUFReader(index.path)
    part = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(part, index.params.arch, endianess=reader.endianess)
    try:
        writer.data_alignment = ALIGNMENT
        writer.add_uint32(gguf.Keys.General.ALIGNMENT, ALIGNMENT)
        for field in reader.fields.values():
            if (field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT)
                    or field.name.startswith(("GGUF.", PREFIX))):
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for key, value, kind in _metadata(calibration):
            writer.add_key_value(key, value, kind, sub_type=gguf.GGUFValueType.UINT32 if isinstance(value, list)
                                 else None)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total, done = sum(int(t.n_bytes) for t in reader.tensors), 0
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            done += int(t.n_bytes)
            if progress:
                progress(done, total)
        writer.close()
        os.replace(part, out)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return out


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

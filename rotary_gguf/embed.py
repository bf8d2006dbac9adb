"""Rotary-aware GGUF: any GGUF, copied with its calibration as `rotary.*` metadata and its tensor data aligned
to 4096 bytes (so expert slices copy from page-aligned memory). Stock llama.cpp loads it unchanged.

The `rotary.*` keys are described, and read back, in rotary_gguf.calibration.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from rotary_gguf.calibration import METADATA_FORMAT_VERSION, Calibration
from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex

ALIGNMENT = 4096
PREFIX = "rotary."


class EmbedError(RotaryError):
    """The rotary-aware GGUF cannot be written."""


def _metadata(calibration: Calibration) -> list[tuple[str, object, gguf.GGUFValueType]]:
    u32, s = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
    items = [("rotary.format_version", METADATA_FORMAT_VERSION, u32),
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


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: tuple[str, ...] = ()) -> None:
    """Every key-value of reader's file into writer, except the architecture and alignment (the writer's
    own) and keys starting with one of `skip`."""
    for field in reader.fields.values():
        if (field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT)
                or field.name.startswith(("GGUF.", *skip))):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


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
        copy_metadata(reader, writer, skip=(PREFIX,))
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

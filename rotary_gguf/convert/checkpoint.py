"""An HF checkpoint read without torch: config.json (transformers 4.x and 5.x keys) and safetensors shards
memory-mapped through numpy, one tensor at a time (bf16 widened to f32 by a 16-bit shift)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rotary_gguf.errors import RotaryError

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class ConvertError(RotaryError):
    """The checkpoint cannot be converted (missing or corrupt files, shapes, types, unsupported model)."""


@dataclass(frozen=True)
class HFConfig:
    """config.json with transformers 5.x names folded onto 4.x ones (num_local_experts -> num_experts,
    rope_parameters.rope_theta -> rope_theta, dtype -> torch_dtype); a multimodal config's text_config keys
    override the top level (as convert_hf_to_gguf.py reads them), model_type stays the top level's."""

    raw: dict[str, Any]
    model_type: str
    folder: Path | None = None  # where config.json was read (a family may read its tokenizer files)

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            if key in self.raw and self.raw[key] is not None:
                return self.raw[key]
        return default

    def require(self, *keys: str) -> Any:
        value = self.get(*keys)
        if value is None:
            raise ConvertError(f"config.json has no {' or '.join(keys)}")
        return value

    @property
    def n_expert(self) -> int:
        return int(self.require("num_experts", "num_local_experts", "n_routed_experts"))

    @property
    def rope_theta(self) -> float:
        rope = self.raw.get("rope_parameters") or {}
        rope = rope.get("full_attention", rope)  # per layer type (gemma4): the full-attention layers' base
        return float(self.get("rope_theta", default=rope.get("rope_theta", 10000.0)))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=self.require("hidden_size") // self.require("num_attention_heads")))


def load_config(folder: Path) -> HFConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{folder}: no config.json (not an HF checkpoint folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: unreadable config: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ConvertError(f"{path}: no model_type")
    if isinstance(raw.get("text_config"), dict):  # a multimodal release: its text model's keys at the top
        return HFConfig({**raw, **raw["text_config"]}, raw["model_type"], folder)
    return HFConfig(raw, raw["model_type"], folder)


@dataclass(frozen=True)
class StoredTensor:
    name: str
    file: Path
    dtype: str  # F32 | F16 | BF16
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ConvertError(f"{path}: truncated safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > 100 * 2**20:
                raise ConvertError(f"{path}: corrupt safetensors header ({length} bytes)")
            header = json.loads(f.read(length))
        return {"__length__": length, **header}
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing shard") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: corrupt safetensors header: {exc}") from None


def list_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint (one file, or the shards an index names), validated against file sizes."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConvertError(f"{index}: unreadable shard index: {exc}") from None
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{folder}: no model.safetensors (nor a shard index)")
    found: dict[str, StoredTensor] = {}
    for path in files:
        header = _header(path)
        base, size = 8 + header.pop("__length__"), path.stat().st_size
        header.pop("__metadata__", None)
        for name, info in header.items():
            dtype = info.get("dtype")
            if dtype not in _DTYPES:
                raise ConvertError(f"{path}: tensor {name} has dtype {dtype}; supported: F32, F16, BF16")
            start, end = info["data_offsets"]
            shape = tuple(int(x) for x in info["shape"])
            if end - start != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize or base + end > size:
                raise ConvertError(f"{path}: tensor {name} ({dtype} {list(shape)}) does not match its byte range")
            found[name] = StoredTensor(name, path, dtype, shape, base + start, end - start)
    return found


def read_tensor(t: StoredTensor, rows: slice = slice(None)) -> np.ndarray:
    """The tensor (or a range of its first axis) as float32: f16 and f32 as stored, bf16 widened exactly.
    Memory-mapped: only the rows asked for are read."""
    raw = np.memmap(t.file, dtype=_DTYPES[t.dtype], mode="r", offset=t.start, shape=t.shape)[rows]
    if t.dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)

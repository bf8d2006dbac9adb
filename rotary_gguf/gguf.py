"""GGUF expert index: what a MoE model holds, by class and layer, and where each expert's bytes are.

The file is opened with gguf-py's zero-copy reader (headers are parsed, tensor data stays in the mmap);
every tensor is classified, and every routed-expert tensor is split into per-expert blocks: expert e of
a tensor whose last ggml dimension counts experts is the contiguous range
``data_offset + e * nbytes / n_expert`` (rows are whole quant blocks).
"""

from __future__ import annotations

import enum
import math
import os
import re
import struct
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.constants import (
    GGML_QUANT_SIZES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from rotary_gguf.errors import (
    GGUFError,
    MalformedGGUFError,
    NotGGUFError,
    NotMoEError,
    RotaryError,
    UnknownTypeError,
)
from rotary_gguf.memory import LayerMemory, layer_memory

__all__ = [
    "ExpertBlock",
    "ModelIndex",
    "MoEParams",
    "TensorClass",
    "TensorEntry",
    "open_index",
]


class TensorClass(str, enum.Enum):
    """What a tensor is for, as far as placement is concerned."""

    TOKEN_EMBEDDING = "token_embedding"
    OUTPUT_HEAD = "output_head"
    ATTENTION = "attention"
    NORM = "norm"
    ROUTER = "router"
    SHARED_EXPERT = "shared_expert"
    ROUTED_EXPERT = "routed_expert"
    EXPERT_BIAS = "expert_bias"  # per-expert biases and scales, stored beside the routed experts
    DENSE_FFN = "dense_ffn"
    OTHER = "other"


# Routed-expert tensors and the projection name their blocks carry.
_ROUTED_PROJ: dict[MODEL_TENSOR, str] = {
    MODEL_TENSOR.FFN_GATE_EXP: "gate",
    MODEL_TENSOR.FFN_UP_EXP: "up",
    MODEL_TENSOR.FFN_DOWN_EXP: "down",
    MODEL_TENSOR.FFN_GATE_UP_EXP: "gate_up",
    MODEL_TENSOR.FFN_GATE_CHEXP: "gate_ch",
    MODEL_TENSOR.FFN_UP_CHEXP: "up_ch",
    MODEL_TENSOR.FFN_DOWN_CHEXP: "down_ch",
}
_PROJ_ORDER = {proj: i for i, proj in enumerate(_ROUTED_PROJ.values())}
_ROUTER = {MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_EXP_PROBS_B}
# Per-layer expert tensors the pinned llama.cpp (src/llama-arch.cpp) names that the installed gguf-py may
# not: deepseek4's second selection bias and its hash-routing table (token id -> experts) are routing.
_PINNED_EXPERT_NAMES: dict[str, TensorClass] = {
    "exp_probs_b_vl": TensorClass.ROUTER,
    "ffn_gate_tid2eid": TensorClass.ROUTER,
}
_DENSE_FFN = {MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP, MODEL_TENSOR.FFN_DOWN}
_PARTS = ("weight", "bias", "scale", "input_scale")
_LAYER_PREFIX = "blk.{bid}."
# Older Mixtral GGUFs store one 2-D tensor per expert: blk.N.ffn_gate.E.weight.
_LEGACY_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.(weight|bias|scale|input_scale)$")
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
_GGML_MAX_DIMS = 4
_FAST_ARRAY_MIN = 1024  # metadata arrays at least this long are read in one step


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: its class, layer (None for global tensors) and absolute byte range."""

    name: str
    cls: TensorClass
    layer: int | None
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first
    offset: int
    nbytes: int
    file: int = 0  # index into ModelIndex.files (split models)


@dataclass(frozen=True)
class ExpertBlock:
    """The bytes of one expert's projection in one layer, addressable on their own."""

    layer: int
    expert: int
    proj: str  # gate | up | down | gate_up (| *_ch for chunked experts)
    part: str  # weight | bias | scale | input_scale
    offset: int  # absolute file offset
    nbytes: int
    type: GGMLQuantizationType
    tensor: str
    file: int = 0  # index into ModelIndex.files (split models)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "layer": self.layer,
            "expert": self.expert,
            "proj": self.proj,
            "part": self.part,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "type": self.type.name,
        }


@dataclass(frozen=True)
class MoEParams:
    """Architecture and MoE hyperparameters, read with gguf.constants keys (per-layer arrays: the max)."""

    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_embd: int
    n_ff_exp: int
    n_ff_shexp: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    n_head_kv_layers: tuple[int, ...]  # per layer (0 for recurrent layers of hybrid models)
    head_dim_k: int
    head_dim_v: int
    n_vocab: int


@dataclass(frozen=True)
class ModelIndex:
    """A typed, frozen view of one GGUF: parameters, classified tensors and per-expert blocks."""

    path: Path
    file_size: int  # all files together
    params: MoEParams
    tensors: tuple[TensorEntry, ...]
    experts: tuple[ExpertBlock, ...]
    metadata: dict[str, Any] = field(repr=False, compare=False)
    files: tuple[Path, ...] = ()  # every file of a split model, in order (offsets are per file)

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

    def require_moe(self) -> ModelIndex:
        """Return self, or raise NotMoEError for a dense model."""
        if not self.is_moe:
            raise NotMoEError(
                f"{self.path}: architecture {self.params.arch!r} has no routed-expert tensors "
                "(a dense model); rotary works on Mixture-of-Experts models"
            )
        return self

    @cached_property
    def bytes_by_class(self) -> dict[str, int]:
        totals = {c.value: 0 for c in TensorClass}
        for t in self.tensors:
            totals[t.cls.value] += t.nbytes
        return totals

    @cached_property
    def loaded_bytes_by_class(self) -> dict[str, int]:
        """bytes_by_class without the NextN blocks, whose tensors llama.cpp does not load for decoding."""
        totals = dict(self.bytes_by_class)
        for layer in self.nextn_layers:
            for cls, n in self.bytes_by_layer.get(layer, {}).items():
                totals[cls] -= n
        return totals

    @cached_property
    def bytes_by_layer(self) -> dict[int, dict[str, int]]:
        """Bytes per class for each layer that has tensors (global tensors are left out)."""
        layers: dict[int, Counter[str]] = defaultdict(Counter)
        for t in self.tensors:
            if t.layer is not None:
                layers[t.layer][t.cls.value] += t.nbytes
        return {layer: dict(layers[layer]) for layer in sorted(layers)}

    @cached_property
    def type_counts(self) -> dict[str, int]:
        """How many tensors of each ggml type, most common first."""
        return dict(Counter(t.type.name for t in self.tensors).most_common())

    @cached_property
    def layer_memory(self) -> tuple[LayerMemory, ...]:
        """Per layer: KV elements per token, sliding window, recurrent state, NextN (rotary_gguf.memory)."""
        p = self.params
        return layer_memory(self.metadata, p.arch, p.n_layer, p.n_head, p.n_embd)

    @cached_property
    def nextn_layers(self) -> tuple[int, ...]:
        """MTP/NextN blocks: llama.cpp skips their tensors when loading for normal decoding."""
        return tuple(m.layer for m in self.layer_memory if m.nextn)

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """Layers with routed experts that decoding runs (NextN blocks left out: they get no slots)."""
        return tuple(sorted({b.layer for b in self.experts} - set(self.nextn_layers)))

    @cached_property
    def _blocks_by_layer_expert(self) -> dict[tuple[int, int], tuple[ExpertBlock, ...]]:
        grouped: dict[tuple[int, int], list[ExpertBlock]] = defaultdict(list)
        for b in self.experts:
            grouped[(b.layer, b.expert)].append(b)
        return {key: tuple(blocks) for key, blocks in grouped.items()}

    @cached_property
    def stacked_expert_weights(self) -> tuple[TensorEntry, ...]:
        """The 3-D routed-expert weights ([ne0, ne1, n_expert]: gate, up, down or fused gate_up per layer),
        the tensors whose experts llama.cpp multiplies with MUL_MAT_ID; biases and the old
        one-tensor-per-expert layout are left out, and so are NextN blocks (llama.cpp does not load them)."""
        nextn = set(self.nextn_layers)
        return tuple(t for t in self.tensors if t.cls is TensorClass.ROUTED_EXPERT and len(t.shape) == 3
                     and t.name.endswith(".weight") and t.layer not in nextn)

    def slot_bytes(self, layer: int) -> int:
        """Bytes of one expert of this layer in the stacked weights: what one rotary VRAM slot holds."""
        return sum(t.nbytes // t.shape[2] for t in self.stacked_expert_weights if t.layer == layer)

    def expert_blocks(self, layer: int, expert: int) -> tuple[ExpertBlock, ...]:
        """All blocks (every projection, weights and biases) of one expert in one layer."""
        return self._blocks_by_layer_expert.get((layer, expert), ())

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of this layer, all projections and biases."""
        return sum(b.nbytes for b in self.expert_blocks(layer, 0))

    @cached_property
    def max_expert_bytes(self) -> int:
        """Bytes of the largest single expert over all layers (what one VRAM slot must hold)."""
        return max((self.expert_bytes(layer) for layer in self.moe_layers), default=0)

    @cached_property
    def expert_bytes_by_proj(self) -> dict[str, int]:
        """Bytes of one expert per projection (weights and biases), the largest over layers."""
        sizes: dict[str, int] = {}
        for layer in self.moe_layers:
            per_proj: Counter[str] = Counter()
            for b in self.expert_blocks(layer, 0):
                per_proj[b.proj] += b.nbytes
            for proj, n in per_proj.items():
                sizes[proj] = max(sizes.get(proj, 0), n)
        return sizes

    @cached_property
    def host_capable_bytes(self) -> int:
        """Bytes that can live in host memory: routed experts (with their biases) and the token embedding."""
        c = self.bytes_by_class
        return c["routed_expert"] + c["expert_bias"] + c["token_embedding"]

    @cached_property
    def vram_resident_bytes(self) -> int:
        """Bytes that stay in VRAM whatever the expert placement: all the rest."""
        return sum(self.bytes_by_class.values()) - self.host_capable_bytes

    def to_json(self, *, with_experts: bool = True) -> dict[str, Any]:
        p = self.params
        out: dict[str, Any] = {
            "file": str(self.path),
            "files": [str(f) for f in self.files],
            "file_size": self.file_size,
            **{k: getattr(p, k) for k in p.__dataclass_fields__},
            "n_tensors": len(self.tensors),
            "moe_layers": list(self.moe_layers),
            "nextn_layers": list(self.nextn_layers),
            "layer_memory": [m.to_json() for m in self.layer_memory],
            "bytes_by_class": self.bytes_by_class,
            "bytes_by_layer": {str(k): v for k, v in self.bytes_by_layer.items()},
            "expert_bytes": self.max_expert_bytes,
            "expert_bytes_by_proj": self.expert_bytes_by_proj,
            "expert_bytes_by_layer": {str(layer): self.expert_bytes(layer) for layer in self.moe_layers},
            "vram_resident_bytes": self.vram_resident_bytes,
            "host_capable_bytes": self.host_capable_bytes,
            "types": self.type_counts,
        }
        if with_experts:
            out["experts"] = [b.to_json() for b in self.experts]
        return out


class _CheckedReader(GGUFReader):
    """GGUFReader that validates each tensor description before gguf-py builds its views.

    gguf-py would otherwise fail late with a numpy reshape error that names no tensor.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(path, "r")

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        """Long arrays (a 150k-token vocabulary and its merges) in one step instead of one view per item.

        gguf-py builds a numpy view per element, ~8 s for a Qwen3 vocabulary. Numeric arrays become one
        view (contents() still returns every value); long string arrays are skipped over and kept as one
        raw byte view (contents() returns []): the index never needs the token strings.
        """
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, count_arr = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        if len(raw_itype) < 1 or len(count_arr) < 1 or int(count_arr[0]) < _FAST_ARRAY_MIN:
            return super()._get_field_parts(orig_offs, raw_type)
        itype, count, offs = GGUFValueType(int(raw_itype[0])), int(count_arr[0]), orig_offs + 12
        if itype == GGUFValueType.STRING:
            end = self._skip_strings(offs, count)
            blob = self._get(offs, np.uint8, end - offs)
            return end - orig_offs, [raw_itype, count_arr, blob], [], [GGUFValueType.ARRAY, itype]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, nptype, count)
        if len(values) != count:
            raise MalformedGGUFError(f"{self._path}: metadata array of {count} values runs past the end of the file")
        return 12 + int(values.nbytes), [raw_itype, count_arr, values], [2], [GGUFValueType.ARRAY, itype]

    def _skip_strings(self, offs: int, count: int) -> int:
        little = (sys.byteorder == "little") == (self.byte_order == "I")
        unpack = struct.Struct("<Q" if little else ">Q").unpack_from
        size = len(self.data)
        for _ in range(count):
            if offs + 8 > size:
                break
            offs += 8 + unpack(self.data, offs)[0]
        else:
            if offs <= size:
                return offs
        raise MalformedGGUFError(f"{self._path}: metadata string array of {count} runs past the end of the file")

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        file_size = len(self.data)
        for fld in fields:
            _, name_data, _, dims, raw_dtype, offset = fld.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise UnknownTypeError(
                    f"{self._path}: tensor {name!r} has unknown ggml type {int(raw_dtype[0])}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            ne = [int(d) for d in dims]
            if not 1 <= len(ne) <= _GGML_MAX_DIMS:
                raise MalformedGGUFError(
                    f"{self._path}: tensor {name!r} has {len(ne)} dimensions (ggml allows 1 to {_GGML_MAX_DIMS})"
                )
            if ne[0] % block:
                raise MalformedGGUFError(
                    f"{self._path}: tensor {name!r} row length {ne[0]} is not a multiple of "
                    f"the {qtype.name} block size {block}"
                )
            nbytes = math.prod(ne) * type_size // block  # Python ints: hostile shapes cannot overflow
            rel = int(offset[0])
            if rel % self.alignment:
                raise MalformedGGUFError(
                    f"{self._path}: tensor {name!r} data offset {rel} is not aligned to {self.alignment} bytes"
                )
            start = start_offs + rel
            if start + nbytes > file_size:
                raise MalformedGGUFError(
                    f"{self._path}: tensor {name!r} ({qtype.name}, {nbytes} bytes at offset {start}) "
                    f"runs past the end of the file ({file_size} bytes): truncated or corrupt"
                )
        super()._build_tensors(start_offs, fields)


def _read(path: Path) -> _CheckedReader:
    if not path.exists():
        raise RotaryError(f"{path}: no such file")
    if not path.is_file():
        raise RotaryError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size < 24:
        raise NotGGUFError(f"{path}: not a GGUF file ({size} bytes, too short for a GGUF header)")
    try:
        return _CheckedReader(path)
    except GGUFError:
        raise
    except ValueError as exc:
        if "magic" in str(exc):
            raise NotGGUFError(f"{path}: not a GGUF file (no GGUF magic at the start)") from None
        raise MalformedGGUFError(f"{path}: corrupt GGUF header: {exc}") from None
    except (IndexError, OverflowError, KeyError, UnicodeDecodeError, TypeError, MemoryError) as exc:
        raise MalformedGGUFError(
            f"{path}: GGUF header is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from None
    except OSError as exc:
        raise RotaryError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    """Scalar and short-array metadata values (long arrays such as the vocabulary are summarised; numeric
    arrays up to 4096 entries, such as per-expert calibration counts, are kept)."""
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or not fld.types:
            continue
        length = int(fld.parts[4][0]) if fld.types[0] == GGUFValueType.ARRAY else 0
        if length > 4096 or length > 256 and fld.types[-1] == GGUFValueType.STRING:
            meta[key] = f"<array of {int(fld.parts[4][0])} {fld.types[-1].name.lower()}>"
            continue
        try:
            meta[key] = fld.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            meta[key] = "<undecodable>"
    return meta


def _int_key(meta: dict[str, Any], key: str, default: int = 0) -> int:
    """An integer hyperparameter; per-layer arrays give their maximum."""
    value = meta.get(key, default)
    if isinstance(value, list):
        value = max((int(v) for v in value), default=default)
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _per_layer(value: Any, n_layer: int) -> tuple[int, ...]:
    """A hyperparameter that may be one number or one per layer, as one per layer."""
    if isinstance(value, list):
        values = [int(v) for v in value][:n_layer]
        return tuple(values + [values[-1] if values else 0] * (n_layer - len(values)))
    try:
        return (int(value),) * n_layer
    except (TypeError, ValueError):
        return (0,) * n_layer


def _name_tables() -> tuple[dict[str, MODEL_TENSOR], dict[str, MODEL_TENSOR]]:
    per_layer: dict[str, MODEL_TENSOR] = {}
    global_names: dict[str, MODEL_TENSOR] = {}
    for kind, template in TENSOR_NAMES.items():
        if template.startswith(_LAYER_PREFIX):
            per_layer.setdefault(template[len(_LAYER_PREFIX):], kind)
        elif "{" not in template:
            global_names.setdefault(template, kind)
    return per_layer, global_names


_PER_LAYER_NAMES, _GLOBAL_NAMES = _name_tables()


def _class_of(kind: MODEL_TENSOR | None, part: str) -> TensorClass:
    if kind is None:
        return TensorClass.OTHER
    if kind in _ROUTED_PROJ:
        return TensorClass.ROUTED_EXPERT if part == "weight" else TensorClass.EXPERT_BIAS
    if kind.name.endswith("_SHEXP"):
        return TensorClass.SHARED_EXPERT
    if kind in _ROUTER:
        return TensorClass.ROUTER
    if kind is MODEL_TENSOR.TOKEN_EMBD:
        return TensorClass.TOKEN_EMBEDDING
    if kind is MODEL_TENSOR.OUTPUT:
        return TensorClass.OUTPUT_HEAD
    if "NORM" in kind.name:
        return TensorClass.NORM
    if kind.name.startswith("ATTN_"):
        return TensorClass.ATTENTION
    if kind in _DENSE_FFN:
        return TensorClass.DENSE_FFN
    return TensorClass.OTHER


def _split_part(name: str) -> tuple[str, str]:
    base, dot, part = name.rpartition(".")
    if dot and part in _PARTS:
        return base, part
    return name, "weight"


def classify(name: str) -> tuple[TensorClass, int | None, MODEL_TENSOR | None, str]:
    """Class, layer, gguf-py tensor kind and part (weight|bias|scale) of a tensor name."""
    base, part = _split_part(name)
    m = _LAYER_NAME.match(base)
    if m is None:
        kind = _GLOBAL_NAMES.get(base)
        return _class_of(kind, part), None, kind, part
    layer, suffix = int(m.group(1)), m.group(2)
    kind = _PER_LAYER_NAMES.get(suffix)
    if kind is None and suffix in _PINNED_EXPERT_NAMES:
        return _PINNED_EXPERT_NAMES[suffix], layer, None, part
    return _class_of(kind, part), layer, kind, part


def _expert_blocks(entry: TensorEntry, proj: str, part: str) -> list[ExpertBlock]:
    """Split a tensor whose last ggml dimension counts experts into one block per expert: weights
    [ne0, ne1, n_expert], biases [ne0, n_expert], per-expert scalars [n_expert] (gemma4's down scale)."""
    n_expert = entry.shape[-1]
    block, _ = GGML_QUANT_SIZES[entry.type]
    per_expert_elems = math.prod(entry.shape[:-1])
    if not n_expert or entry.nbytes % n_expert or per_expert_elems % block:
        raise MalformedGGUFError(
            f"expert tensor {entry.name!r} shape {list(entry.shape)} ({entry.type.name}) "
            f"does not split into {n_expert} whole-block experts"
        )
    size = entry.nbytes // n_expert
    return [
        ExpertBlock(entry.layer or 0, e, proj, part, entry.offset + e * size, size, entry.type, entry.name, entry.file)
        for e in range(n_expert)
    ]


def _entries_and_blocks(reader: GGUFReader, file: int) -> tuple[list[TensorEntry], list[ExpertBlock]]:
    entries: list[TensorEntry] = []
    blocks: list[ExpertBlock] = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in t.shape)
        legacy = _LEGACY_EXPERT.match(t.name)
        if legacy:
            layer, proj, expert, part = int(legacy[1]), legacy[2], int(legacy[3]), legacy[4]
            cls = TensorClass.ROUTED_EXPERT if part == "weight" else TensorClass.EXPERT_BIAS
            entry = TensorEntry(t.name, cls, layer, t.tensor_type, shape, int(t.data_offset), int(t.n_bytes), file)
            blocks.append(ExpertBlock(layer, expert, proj, part, entry.offset, entry.nbytes, entry.type, t.name, file))
            entries.append(entry)
            continue
        cls, layer, kind, part = classify(t.name)
        entry = TensorEntry(t.name, cls, layer, t.tensor_type, shape, int(t.data_offset), int(t.n_bytes), file)
        entries.append(entry)
        if cls in (TensorClass.ROUTED_EXPERT, TensorClass.EXPERT_BIAS) and kind is not None:
            blocks.extend(_expert_blocks(entry, _ROUTED_PROJ[kind], part))
    return entries, blocks


def _params(meta: dict[str, Any], entries: list[TensorEntry], blocks: list[ExpertBlock]) -> MoEParams:
    arch = str(meta.get(Keys.General.ARCHITECTURE, "unknown"))

    def key(template: str, default: int = 0) -> int:
        return _int_key(meta, template.format(arch=arch), default)

    n_embd = key(Keys.LLM.EMBEDDING_LENGTH)
    n_head = key(Keys.Attention.HEAD_COUNT)
    head_dim = n_embd // n_head if n_head else 0
    n_layer = key(Keys.LLM.BLOCK_COUNT) or 1 + max((e.layer for e in entries if e.layer is not None), default=-1)
    n_ff_exp = key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
    if not n_ff_exp:
        # Mixtral-style files give the expert width as feed_forward_length; the tensors always know it.
        down = next((b.tensor for b in blocks if b.proj == "down" and b.part == "weight"), None)
        n_ff_exp = next((e.shape[0] for e in entries if e.name == down), 0)
    token_embd = next((e for e in entries if e.cls is TensorClass.TOKEN_EMBEDDING), None)
    return MoEParams(
        arch=arch,
        n_layer=n_layer,
        n_expert=key(Keys.LLM.EXPERT_COUNT) or len({b.expert for b in blocks}),
        n_expert_used=key(Keys.LLM.EXPERT_USED_COUNT),
        n_expert_shared=key(Keys.LLM.EXPERT_SHARED_COUNT),
        n_embd=n_embd,
        n_ff_exp=n_ff_exp,
        n_ff_shexp=key(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH),
        n_ctx_train=key(Keys.LLM.CONTEXT_LENGTH),
        n_head=n_head,
        n_head_kv=key(Keys.Attention.HEAD_COUNT_KV, n_head),
        n_head_kv_layers=_per_layer(meta.get(Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head), n_layer),
        head_dim_k=key(Keys.Attention.KEY_LENGTH, head_dim),
        head_dim_v=key(Keys.Attention.VALUE_LENGTH, head_dim),
        n_vocab=token_embd.shape[-1] if token_embd else key(Keys.LLM.VOCAB_SIZE),
    )


_SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def _split_files(path: Path, meta: dict[str, Any]) -> list[Path]:
    """All files of a split model (llama.cpp's NAME-0000i-of-0000n.gguf), or just `path`."""
    count = _int_key(meta, "split.count", 1)
    if count <= 1:
        return [path]
    m = _SPLIT_NAME.match(path.name)
    if not m or int(m.group(3)) != count:
        raise MalformedGGUFError(f"{path}: split model of {count} files, but the name does not follow "
                                 f"NAME-00001-of-{count:05d}.gguf")
    files = [path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MalformedGGUFError(f"{path}: split model is missing {missing[0]} ({len(missing)} of {count} files)")
    return files


def open_index(path: str | os.PathLike[str]) -> ModelIndex:
    """Index a GGUF file (every file of a split model): headers only, tensor data stays in the mmap.

    Raises NotGGUFError, MalformedGGUFError or UnknownTypeError (all RotaryError) for bad files.
    """
    path = Path(path)
    reader = _read(path)
    meta = _metadata(reader)
    files = _split_files(path, meta)
    readers = [reader if f == path else _read(f) for f in files]
    if len(files) > 1 and files[0] != path:
        meta = _metadata(readers[0])  # the model's metadata lives in the first file
    entries: list[TensorEntry] = []
    blocks: list[ExpertBlock] = []
    for number, (file, file_reader) in enumerate(zip(files, readers, strict=True)):
        try:
            file_entries, file_blocks = _entries_and_blocks(file_reader, number)
        except MalformedGGUFError as exc:
            raise MalformedGGUFError(f"{file}: {exc}") from None
        entries += file_entries
        blocks += file_blocks
    expected = _int_key(meta, "split.tensors.count", len(entries))
    if expected != len(entries):
        raise MalformedGGUFError(f"{files[0]}: split model declares {expected} tensors, its files hold {len(entries)}")
    blocks.sort(key=lambda b: (b.layer, b.expert, _PROJ_ORDER.get(b.proj, 99), b.proj, b.part))
    return ModelIndex(
        path=files[0],
        file_size=sum(len(r.data) for r in readers),
        params=_params(meta, entries, blocks),
        tensors=tuple(entries),
        experts=tuple(blocks),
        metadata=meta,
        files=tuple(files),
    )

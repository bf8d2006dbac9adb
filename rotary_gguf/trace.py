"""Routing traces: which experts every MoE layer selected, step by step, in a compact binary file.

Format (version 2, little-endian; version 1 files, which have no predictions, are read too):

    magic    4 bytes  b"RTRC"
    version  u16      2
    flags    u16      bit 0: synthetic (generated, not recorded from a model)
    length   u32      bytes of the JSON header that follows
    header   JSON     {"model", "description", "layers": [layer ids], "n_expert", "n_expert_used",
                       "slot_bytes": {layer: bytes of one expert's stacked weights}, "dense_bytes",
                       "id_bytes": 1 or 2}
    steps, to the end of the file; each:
      phase  u8       0 prompt batch, 1 decoded token
      per layer, in header order:
        count  u32    expert ids in this step (tokens routed x n_expert_used)
        ids    count x id_bytes, token-major
        pcount u32    (version 2) ids the plugin predicted for this layer one MoE layer ahead (0: none)
        pids   pcount x id_bytes, best first per predicted token

A decoded token costs 1 + layers x (8 + 2 x n_expert_used x id_bytes) bytes with predictions: 1,153 bytes
for Qwen3-30B-A3B.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rotary_gguf.errors import RotaryError

MAGIC = b"RTRC"
VERSION = 2
READABLE_VERSIONS = (1, 2)
FLAG_SYNTHETIC = 1
PHASES = ("prompt", "decode")
_PREFIX = struct.Struct("<4sHHI")


class TraceError(RotaryError):
    """A trace file that cannot be read, or does not fit the model it is used with."""


@dataclass(frozen=True)
class TraceHeader:
    model: str
    layers: tuple[int, ...]
    n_expert: int
    n_expert_used: int
    slot_bytes: dict[int, int]
    dense_bytes: int = 0  # non-expert weight bytes read per token (for speed predictions)
    description: str = ""
    synthetic: bool = False

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.n_expert <= 256 else "<u2")

    @classmethod
    def for_model(cls, index: Any, description: str = "") -> TraceHeader:
        """The header of a trace recorded from a model (a rotary_gguf.gguf.ModelIndex)."""
        per_token = ("routed_expert", "expert_bias", "token_embedding")
        dense = sum(n for cls_name, n in index.bytes_by_class.items() if cls_name not in per_token)
        return cls(index.path.name, index.moe_layers, index.params.n_expert, index.params.n_expert_used,
                   {layer: index.slot_bytes(layer) for layer in index.moe_layers}, dense, description)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "description": self.description, "layers": list(self.layers),
                "n_expert": self.n_expert, "n_expert_used": self.n_expert_used,
                "slot_bytes": {str(k): v for k, v in self.slot_bytes.items()}, "dense_bytes": self.dense_bytes,
                "id_bytes": self.id_dtype.itemsize, "synthetic": self.synthetic}


@dataclass
class Trace:
    header: TraceHeader
    steps: list[tuple[str, dict[int, np.ndarray]]] = field(default_factory=list)
    # per step (when recorded): each layer's experts as the plugin predicted them one MoE layer ahead
    predictions: list[dict[int, np.ndarray]] = field(default_factory=list)

    def predicted(self, step: int) -> dict[int, np.ndarray]:
        """The predictions recorded with a step (empty: none, as in version 1 files and synthetic traces)."""
        return self.predictions[step] if step < len(self.predictions) else {}

    @property
    def has_predictions(self) -> bool:
        return any(ids.size for step in self.predictions for ids in step.values())

    @property
    def decode_steps(self) -> int:
        return sum(1 for phase, _ in self.steps if phase == "decode")


class TraceWriter:
    """Writes steps as they happen; the file appears under its name only when closed (temp + rename)."""

    def __init__(self, path: str | os.PathLike[str], header: TraceHeader) -> None:
        self.path, self.header = Path(path), header
        self._part = self.path.with_name(self.path.name + ".part")
        try:
            self._file: BinaryIO = open(self._part, "wb")  # noqa: SIM115  (closed by close())
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot write the trace: {exc.strerror}") from None
        body = json.dumps(header.to_json()).encode()
        self._file.write(_PREFIX.pack(MAGIC, VERSION, FLAG_SYNTHETIC if header.synthetic else 0, len(body)) + body)
        self.steps = 0

    def write_step(self, phase: str, routing: dict[int, np.ndarray],
                   predicted: dict[int, np.ndarray] | None = None) -> None:
        parts = [bytes([PHASES.index(phase)])]
        for layer in self.header.layers:
            for ids in (routing.get(layer, ()), (predicted or {}).get(layer, ())):
                ids = np.asarray(ids, dtype=self.header.id_dtype)
                parts += [struct.pack("<I", len(ids)), ids.tobytes()]
        self._file.write(b"".join(parts))
        self.steps += 1

    def close(self) -> Path:
        self._file.close()
        self._part.replace(self.path)
        return self.path

    def discard(self) -> None:
        self._file.close()
        self._part.unlink(missing_ok=True)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, failure: type[BaseException] | None, *_: object) -> None:
        """Keep the trace when the block completed, discard it when it raised (Ctrl-C included)."""
        if failure is None:
            self.close()
        else:
            self.discard()


def _header(path: Path, data: bytes, flags: int) -> TraceHeader:
    try:
        h = json.loads(data)
        return TraceHeader(model=str(h["model"]), layers=tuple(int(x) for x in h["layers"]),
                           n_expert=int(h["n_expert"]), n_expert_used=int(h["n_expert_used"]),
                           slot_bytes={int(k): int(v) for k, v in h["slot_bytes"].items()},
                           dense_bytes=int(h.get("dense_bytes", 0)), description=str(h.get("description", "")),
                           synthetic=bool(flags & FLAG_SYNTHETIC))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TraceError(f"{path}: corrupt trace header ({exc})") from None


def _ids(path: Path, f: BinaryIO, header: TraceHeader, layer: int) -> np.ndarray:
    count_bytes = f.read(4)
    count = struct.unpack("<I", count_bytes)[0] if len(count_bytes) == 4 else -1
    data = f.read(count * header.id_dtype.itemsize) if count >= 0 else b""
    if count < 0 or len(data) != count * header.id_dtype.itemsize:
        raise TraceError(f"{path}: truncated trace (a step ends at byte {f.tell()})")
    ids = np.frombuffer(data, dtype=header.id_dtype).astype(np.int32)
    if ids.size and ids.max() >= header.n_expert:
        raise TraceError(f"{path}: expert id {ids.max()} in layer {layer} is beyond n_expert {header.n_expert}")
    return ids


def _steps(path: Path, f: BinaryIO, header: TraceHeader, version: int,
           ) -> Iterator[tuple[str, dict[int, np.ndarray], dict[int, np.ndarray]]]:
    while phase_byte := f.read(1):
        if phase_byte[0] >= len(PHASES):
            raise TraceError(f"{path}: corrupt trace: step phase {phase_byte[0]} at byte {f.tell() - 1}")
        routing, predicted = {}, {}
        for layer in header.layers:
            routing[layer] = _ids(path, f, header, layer)
            if version >= 2:
                predicted[layer] = _ids(path, f, header, layer)
        yield PHASES[phase_byte[0]], routing, predicted


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a whole trace, validating it (one TraceError naming the file and the problem)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or prefix[:4] != MAGIC:
                raise TraceError(f"{path}: not a rotary routing trace (no RTRC magic)")
            _, version, flags, length = _PREFIX.unpack(prefix)
            if version not in READABLE_VERSIONS:
                raise TraceError(f"{path}: trace format version {version}; this rotary reads versions "
                                 f"{', '.join(map(str, READABLE_VERSIONS))}")
            header = _header(path, f.read(length), flags)
            steps = list(_steps(path, f, header, version))
            return Trace(header, [(phase, routing) for phase, routing, _ in steps],
                         [predicted for _, _, predicted in steps])
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc.strerror}") from None


@dataclass(frozen=True)
class SyntheticRouting:
    """Parameters of the synthetic routing model (per layer, independently):

    - every request draws its own expert popularity around the layer's global one: Dirichlet with
      concentration `request_concentration` x n_expert x global (small: a few experts dominate a request,
      many go unused);
    - every token picks n_expert_used distinct experts with probability proportional to that popularity,
      times (1 + `reuse`) for the experts the previous token used (locality between tokens);
    - between requests the global popularity drifts: `drift` of it is redrawn.

    The defaults are fitted (scripts/fit_synthetic_trace.py) to published Qwen3-30B-A3B measurements:
    per-layer LRU caches hit ~67% with 1/8 of the experts and ~81% with 1/4 (the fit gives 67.3% and
    78.7%, with 29% of the experts unused within a request against ~25% published)."""

    request_concentration: float = 0.6
    reuse: float = 10.0
    drift: float = 0.3


def synthetic_trace(layers: int = 48, n_expert: int = 128, n_used: int = 8, *, requests: int = 4,
                    prompt_tokens: int = 64, decode_tokens: int = 256, slot_bytes: int = 1_769_472,
                    dense_bytes: int = 600_000_000, params: SyntheticRouting = SyntheticRouting(),
                    seed: int = 0, model: str = "synthetic qwen3-30b-a3b shapes") -> Trace:
    """A synthetic trace (labelled as such in its header): per request one prompt step and decode steps."""
    rng = np.random.default_rng(seed)
    header = TraceHeader(model, tuple(range(layers)), n_expert, n_used, dict.fromkeys(range(layers), slot_bytes),
                         dense_bytes, f"synthetic routing {params}", synthetic=True)
    trace = Trace(header)
    popularity = rng.dirichlet(np.full(n_expert, 2.0), size=layers)
    for _ in range(requests):
        fresh = rng.dirichlet(np.full(n_expert, 2.0), size=layers)
        popularity = (1 - params.drift) * popularity + params.drift * fresh
        request = np.stack([rng.dirichlet(params.request_concentration * n_expert * p + 1e-3) for p in popularity])
        previous = np.zeros((layers, n_expert), dtype=bool)
        for phase, n_tokens in (("prompt", prompt_tokens), *[("decode", 1)] * decode_tokens):
            routing = {}
            for layer in range(layers):
                picks = []
                for _ in range(n_tokens):
                    weight = request[layer] * (1 + params.reuse * previous[layer]) + 1e-12
                    chosen = np.argsort(np.log(weight) + rng.gumbel(size=n_expert))[-n_used:][::-1]
                    previous[layer] = False
                    previous[layer][chosen] = True
                    picks.append(chosen)
                routing[layer] = np.concatenate(picks).astype(np.int32)
            trace.steps.append((phase, routing))
    return trace


def write_trace(path: str | os.PathLike[str], trace: Trace) -> Path:
    with TraceWriter(path, trace.header) as writer:
        for i, (phase, routing) in enumerate(trace.steps):
            writer.write_step(phase, routing, trace.predicted(i))
    return writer.path


def lru_reference_hit_rate(trace: Trace, slots: int) -> float:
    """Classic per-layer LRU over the decoded tokens (an expert enters the cache the moment it misses):
    the measure the published figures use, independent of rotary's copy timing."""
    hits = total = 0
    for layer in trace.header.layers:
        cache: dict[int, None] = {}
        for phase, routing in trace.steps:
            if phase != "decode":
                continue
            for expert in routing[layer].tolist():
                total += 1
                if expert in cache:
                    hits += 1
                    cache.pop(expert)
                elif len(cache) >= slots:
                    cache.pop(next(iter(cache)))
                cache[expert] = None
    return hits / total if total else 0.0

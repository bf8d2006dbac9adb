"""Write a synthetic MoE GGUF that llama.cpp loads and runs, tensor by tensor.

At most one tensor is in memory at a time; the file is written under a temporary name and renamed on
success, so an interrupted or failed run leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import quant_shape_to_byte_shape

from rotary_gguf.errors import SynthError
from rotary_gguf.synth.layout import add_hparams, tensor_specs
from rotary_gguf.synth.spec import ModelSpec, TensorSpec, with_vocab
from rotary_gguf.synth.vocab import add_tokenizer, embedded_vocabulary
from rotary_gguf.synth.weights import FLOAT_TYPES, QUANT_TYPES, random_tensor, supported

log = logging.getLogger(__name__)

TYPE_NAMES: dict[str, T] = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0,
                            "q4_k": T.Q4_K, "q6_k": T.Q6_K}
Progress = Callable[[int, int], None]  # (bytes written, total bytes)


@dataclass(frozen=True)
class SynthResult:
    path: Path
    spec: ModelSpec
    qtype: T
    nbytes: int
    seconds: float


def tensor_type(tensor: TensorSpec, base: T) -> T:
    """The ggml type a tensor gets: norms, routers and biases stay F32 (as llama.cpp's quantizer keeps
    them); the output head of a Q4_K model is Q6_K (as Q4_K_M); rows too short for the asked block fall
    back to Q8_0, then F16 (as llama.cpp's quantizer does)."""
    if tensor.role in ("norm", "small", "router", "constant"):
        return T.F32
    want = T.Q6_K if tensor.role == "output" and base is T.Q4_K else base
    for candidate in (want, T.Q8_0, T.F16):
        if supported(candidate, tensor.shape[0]):
            return candidate
    return T.F32


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * type_size


def _data(rng: np.random.Generator, tensor: TensorSpec, qtype: T) -> np.ndarray:
    if tensor.role == "norm":
        return np.ones(tuple(reversed(tensor.shape)), dtype=np.float32)
    if tensor.role == "constant":
        return np.array(tensor.values, dtype=np.float32).reshape(tuple(reversed(tensor.shape)))
    return random_tensor(rng, tensor.shape, qtype, tensor.std)


def _add_tensor_infos(writer: GGUFWriter, plan: list[tuple[TensorSpec, T]]) -> int:
    total = 0
    for tensor, qtype in plan:
        np_shape = tuple(reversed(tensor.shape))
        nbytes = _nbytes(tensor.shape, qtype)
        if qtype in FLOAT_TYPES:
            writer.add_tensor_info(tensor.name, np_shape, np.dtype(FLOAT_TYPES[qtype]), nbytes, raw_dtype=qtype)
        else:
            byte_shape = quant_shape_to_byte_shape(np_shape, qtype)
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        total += GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    return total


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise SynthError(
            f"{directory}: needs {needed / 2**30:.2f} GiB for the model, {free / 2**30:.2f} GiB free; "
            "choose another folder or a smaller --type"
        )


def synth_model(
    out: str | os.PathLike[str],
    spec: ModelSpec,
    qtype: T | str = T.F32,
    *,
    seed: int = 0,
    description: str = "rotary synth",
    sparse: bool = False,
    chat_template: str | None = None,
    progress: Progress | None = None,
) -> SynthResult:
    """Write a random-weight MoE GGUF of `spec` to `out`.

    `sparse=True` writes the header and leaves the tensor data as a hole of the right size (a file
    that indexes like the real thing but holds zeros: for index benchmarks, not for running).
    `chat_template` replaces the default ChatML template ("" writes none).
    """
    started = time.perf_counter()
    base = TYPE_NAMES[qtype] if isinstance(qtype, str) else qtype
    if base not in FLOAT_TYPES and base not in QUANT_TYPES:
        raise SynthError(f"synth cannot write ggml type {base.name}; use one of {', '.join(TYPE_NAMES)}")
    spec = with_vocab(spec, len(embedded_vocabulary().tokens))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = [(t, tensor_type(t, base)) for t in tensor_specs(spec)]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, spec.arch)
        add_hparams(writer, spec, base, f"{description}: random weights, seed {seed}")
        add_tokenizer(writer, spec.n_vocab, chat_template)
        data_bytes = _add_tensor_infos(writer, plan)
        if not sparse:
            _check_space(out.parent, data_bytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if sparse:
            fout = writer.fout[0]
            fout.truncate(GGUFWriter.ggml_pad(fout.tell(), writer.data_alignment) + data_bytes)
        else:
            _write_data(writer, plan, np.random.default_rng(seed), data_bytes, progress)
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = out.stat().st_size
    seconds = time.perf_counter() - started
    log.info("wrote %s (%.1f MB) in %.1f s", out, size / 1e6, seconds)
    return SynthResult(out, spec, base, size, seconds)


def _write_data(writer: GGUFWriter, plan: list[tuple[TensorSpec, T]], rng: np.random.Generator,
                total: int, progress: Progress | None) -> None:
    done = 0
    for tensor, qtype in plan:
        data = _data(rng, tensor, qtype)
        writer.write_tensor_data(data)
        done += GGUFWriter.ggml_pad(data.nbytes, writer.data_alignment)
        if progress:
            progress(done, total)

"""`rotary convert`: an HF MoE checkpoint to GGUF, without torch.

Safetensors are read through numpy one tensor at a time (per-expert tensors are stacked one layer and
projection at a time), so peak memory stays near the largest stacked tensor, not the model. F32, F16,
BF16 and Q8_0 are written directly, with convert_hf_to_gguf.py's type rules (norms, 1-D tensors, biases
and routers stay F32); K-quants and the other llama.cpp types go through llama.cpp's own quantizer from
an intermediate file at the checkpoint's precision. The output appears only when complete (temp file and
rename); an existing file is kept unless `force`.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np

from rotary_gguf.convert.checkpoint import ConvertError, HFConfig, StoredTensor, list_tensors, load_config, read_tensor
from rotary_gguf.convert.models import model_module
from rotary_gguf.convert.tokenizer import add_vocab

__all__ = ["ConvertError", "DIRECT_TYPES", "convert"]

log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType
DIRECT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Router weights and SSM convolutions stay F32 (convert_hf_to_gguf.py, llama_model_quantize).
_ALWAYS_F32 = re.compile(r"blk\.\d+\.(ffn_gate_inp(_shexp)?|ssm_conv1d)\.weight")


@dataclass(frozen=True)
class OutTensor:
    """One GGUF tensor: its name, the checkpoint tensors it is made of (several when stacked), its type."""

    name: str
    sources: tuple[StoredTensor, ...]
    stacked: bool
    qtype: gguf.GGMLQuantizationType
    derived: Derived | None = None  # a fused checkpoint tensor's part, made expert by expert
    reshaped: tuple[int, ...] | None = None  # the shape a module's transform gives (a squeezed conv kernel)
    generated: np.ndarray | None = None  # a tensor the module computes from the config (gemma4's rope_freqs)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.generated is not None:
            return self.generated.shape
        if self.derived is not None:
            return self.derived.shape
        if self.reshaped is not None:
            return self.reshaped
        first = self.sources[0].shape
        return (len(self.sources), *first) if self.stacked else first


@dataclass(frozen=True)
class Derived:
    """Part of a checkpoint tensor that stores all experts fused (gpt-oss): its stacked shape and how to
    make expert e's slice (float32) from the stored tensor."""

    shape: tuple[int, ...]
    expert: Callable[[int], np.ndarray]


def _qtype(name: str, shape: tuple[int, ...], target: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """convert_hf_to_gguf.py's rules: 1-D tensors, norms, biases and router weights stay F32; rows that a
    block type cannot hold fall back to F16."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or _ALWAYS_F32.fullmatch(name):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[target][0]
    return target if shape[-1] % block == 0 else Q.F16


def block_count(cfg: HFConfig, module: ModuleType, tensors: dict[str, StoredTensor]) -> int:
    """GGUF blocks: the checkpoint's layers, plus any MTP/NextN blocks the module finds in it."""
    extra = getattr(module, "extra_blocks", None)
    return int(cfg.require("num_hidden_layers")) + (extra(cfg, tensors) if extra else 0)


def plan_tensors(cfg: HFConfig, module: ModuleType, tensors: dict[str, StoredTensor],
                 target: gguf.GGMLQuantizationType, n_block: int | None = None) -> list[OutTensor]:
    """Every GGUF tensor, in checkpoint order; an error names any checkpoint tensor left unconverted.
    A module's rename(name, cfg) gives the name gguf-py's table knows, or None for a tensor that is not
    part of the text model (a vision tower); reshape(name, shape, cfg) the shape its transform gives."""
    n_layer = block_count(cfg, module, tensors) if n_block is None else n_block
    names = gguf.get_tensor_name_map(module.ARCH, n_layer)
    experts: dict[tuple[int, str], dict[int, StoredTensor]] = defaultdict(dict)
    pattern = re.compile(module.EXPERT)
    out, left = [], []
    derive, rename = getattr(module, "derive", None), getattr(module, "rename", None)
    reshape = getattr(module, "reshape", None)
    skipped = 0
    for name, t in tensors.items():
        if parts := (derive(name, t, cfg) if derive else None):
            for part_name, shape, expert in parts:
                new = names.get_name(part_name, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ConvertError(f"{part_name}: no GGUF name for {cfg.model_type}")
                out.append(OutTensor(new, (t,), True, _qtype(new, shape, target), Derived(shape, expert)))
            continue
        known = rename(name, cfg) if rename else name
        if known is None:
            skipped += 1
            continue
        if (m := pattern.fullmatch(known)) is not None:
            experts[(int(m.group(1)), m.group(3))][int(m.group(2))] = t
            continue
        new = names.get_name(known, try_suffixes=(".weight", ".bias"))
        if new is None and (own := getattr(module, "gguf_name", None)) is not None:
            new = own(known)  # a name this gguf-py's table lacks for the architecture
        if new is None:
            left.append(name)
            continue
        shape = reshape(name, t.shape, cfg) if reshape else t.shape
        reshaped = shape if shape != t.shape else None
        out.append(OutTensor(new, (t,), False, _qtype(new, shape, target), reshaped=reshaped))
    out += _stacked_experts(cfg, module, names, experts, n_layer, target)
    if skipped:
        log.info("skipping %d tensors of the vision/audio towers: the GGUF holds the text model only", skipped)
    for new, array in getattr(module, "generate", lambda cfg: [])(cfg):
        out.append(OutTensor(new, (), False, _qtype(new, array.shape, target), generated=array))
    left += [f"layer {layer} {proj} experts" for layer, proj in experts]
    if left:
        raise ConvertError(f"{len(left)} checkpoint tensors not converted (unknown names for {cfg.model_type}): "
                           + ", ".join(sorted(left)[:5]) + (" ..." if len(left) > 5 else ""))
    if not any(t.stacked for t in out):
        raise ConvertError(f"no routed-expert tensors matched {module.EXPERT}: not a MoE checkpoint")
    return out


def _stacked_experts(cfg: HFConfig, module: ModuleType, names: gguf.TensorNameMap,
                     experts: dict[tuple[int, str], dict[int, StoredTensor]], n_layer: int,
                     target: gguf.GGMLQuantizationType) -> list[OutTensor]:
    """One 3-D tensor per layer and projection from the per-expert tensors (taken out of `experts`; what is
    left there was not converted), each group checked against the config's expert count and shapes."""
    n_expert, out = cfg.n_expert, []
    ff, hidden = int(cfg.require("moe_intermediate_size", "intermediate_size")), int(cfg.require("hidden_size"))
    for layer in range(n_layer):
        for proj in module.PROJECTIONS:
            group = experts.pop((layer, proj), {})
            if sorted(group) != list(range(n_expert)):
                if group or layer in {key[0] for key in experts}:
                    raise ConvertError(f"layer {layer}: {len(group)} of {n_expert} {proj} experts in the checkpoint")
                continue
            shapes = {t.shape for t in group.values()}
            if len(shapes) != 1 or sorted(next(iter(shapes))) != sorted((ff, hidden)):
                raise ConvertError(f"layer {layer}: {proj} experts have shapes {sorted(shapes)}; config.json implies "
                                   f"{ff} x {hidden} (expert FFN x hidden)")
            stacked = [group[e] for e in range(n_expert)]
            new = names.get_name(module.STACKED.format(layer=layer, proj=proj), try_suffixes=(".weight",))
            out.append(OutTensor(new, tuple(stacked), True, _qtype(new, (n_expert, *stacked[0].shape), target)))
    return out


_ROWS_PER_CHUNK = 4096  # rows of a 2-D tensor converted as one piece of work


def _pieces(t: OutTensor) -> list[tuple[StoredTensor, slice | int]]:
    """Independent pieces of a tensor's conversion: one expert of a stacked tensor, or a block of rows
    (every type written here quantizes rows on their own, so pieces give the same bytes as the whole)."""
    if t.derived is not None:
        return [(t.sources[0], e) for e in range(t.derived.shape[0])]
    if t.stacked:
        return [(s, slice(None)) for s in t.sources]
    source = t.sources[0]
    n_rows = t.shape[0] if len(t.shape) > 1 else 0  # the leading rows only where a module trims (gemma4)
    if n_rows <= _ROWS_PER_CHUNK:
        return [(source, slice(None) if t.reshaped is None else slice(0, n_rows))]
    return [(source, slice(i, min(i + _ROWS_PER_CHUNK, n_rows))) for i in range(0, n_rows, _ROWS_PER_CHUNK)]


def _data(t: OutTensor, cfg: HFConfig, module: ModuleType, pool: ThreadPoolExecutor) -> np.ndarray:
    """The tensor in its output type, converted piece by piece on a thread pool (numpy releases the GIL
    while it casts) into one preallocated array."""
    if t.generated is not None:
        return gguf.quants.quantize(t.generated, t.qtype)
    transform = getattr(module, "transform", None)
    if transform is not None and not getattr(module, "rewrites", lambda name: True)(t.sources[0].name):
        transform = None  # the module leaves this tensor as stored: convert it in pieces
    if transform is not None and not t.stacked:  # a rewrite of the whole tensor (q/k permutation)
        return gguf.quants.quantize(transform(t.sources[0].name, read_tensor(t.sources[0]), cfg), t.qtype)
    pieces = _pieces(t)

    def convert_piece(piece: tuple[StoredTensor, slice | int]) -> np.ndarray:
        source, rows = piece
        data = t.derived.expert(rows) if t.derived is not None else read_tensor(source, rows)
        return gguf.quants.quantize(transform(source.name, data, cfg) if transform else data, t.qtype)

    first = convert_piece(pieces[0])
    if len(pieces) == 1:
        return first[None] if t.stacked else first
    if t.stacked:
        out = np.empty((len(pieces), *first.shape), dtype=first.dtype)
        out[0] = first
        targets = [out[i] for i in range(len(pieces))]
    else:
        out = np.empty((t.shape[0], *first.shape[1:]), dtype=first.dtype)
        targets = [out[rows] for _, rows in pieces]
        targets[0][...] = first

    def fill(i: int) -> None:
        targets[i][...] = convert_piece(pieces[i])

    list(pool.map(fill, range(1, len(pieces))))
    return out


def _parameters(cfg: HFConfig, module: ModuleType, writer: gguf.GGUFWriter, file_type: gguf.LlamaFileType,
                name: str, n_block: int) -> None:
    writer.add_name(name)
    writer.add_block_count(n_block)
    writer.add_context_length(int(cfg.get("max_position_embeddings", default=4096)))
    writer.add_embedding_length(int(cfg.require("hidden_size")))
    if (n_ff := cfg.get("intermediate_size")) is not None or not getattr(module, "NO_DENSE_FFN", False):
        writer.add_feed_forward_length(int(cfg.require("intermediate_size") if n_ff is None else n_ff))
    writer.add_head_count(int(cfg.require("num_attention_heads")))
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads", "num_attention_heads")))
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", default=1e-6)))
    writer.add_expert_count(cfg.n_expert)
    writer.add_expert_used_count(int(cfg.require("num_experts_per_tok", "top_k_experts")))
    writer.add_vocab_size(int(cfg.require("vocab_size")))
    writer.add_file_type(file_type)
    module.parameters(cfg, writer)
    if (per_block := getattr(module, "block_parameters", None)) is not None:
        per_block(cfg, writer, n_block)


def write_gguf(folder: Path, out: Path, type_name: str, progress: Callable[[int, int], None] | None = None) -> None:
    """Write the checkpoint as a GGUF of a DIRECT_TYPES type to `out` (no temp handling here)."""
    cfg = load_config(folder)
    module = model_module(cfg.model_type)
    if (validate := getattr(module, "validate", None)) is not None:
        validate(cfg)
    tensors = list_tensors(folder)
    n_block = block_count(cfg, module, tensors)
    plan = plan_tensors(cfg, module, tensors, DIRECT_TYPES[type_name], n_block)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[module.ARCH])
    try:
        _parameters(cfg, module, writer, _FILE_TYPES[type_name], folder.resolve().name, n_block)
        own_vocab = getattr(module, "add_vocab", None)
        if own_vocab is None or not own_vocab(writer, folder):
            add_vocab(writer, folder, int(cfg.require("vocab_size")), getattr(module, "PRE_TOKENIZER_NAMES", None),
                      getattr(module, "SPECIAL_TOKENS", None))
        for t in plan:
            if t.qtype in (Q.F32, Q.F16):
                dtype, shape = np.dtype(np.float32 if t.qtype == Q.F32 else np.float16), t.shape
            else:
                dtype, shape = np.dtype(np.uint8), gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for done, t in enumerate(plan):
                writer.write_tensor_data(_data(t, cfg, module, pool))
                if progress:
                    progress(done + 1, len(plan))
    finally:
        writer.close()


def convert(folder: str | os.PathLike[str], out: str | os.PathLike[str], type_name: str = "f16", *,
            force: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert an HF MoE checkpoint folder to OUT.gguf of type_name (a DIRECT_TYPES name, or any llama.cpp
    quantization such as q4_k_m, q5_k_m, q6_k, made by llama.cpp's quantizer)."""
    from rotary_gguf import runtime

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder")
    if out.exists() and not force:
        raise ConvertError(f"{out} exists; use --force to overwrite")
    part = out.with_name(out.name + ".part")
    direct = type_name in DIRECT_TYPES
    intermediate = part if direct else out.with_name(out.name + ".src.part")
    try:
        if direct:
            write_gguf(folder, intermediate, type_name, progress)
        else:
            source = {"BF16": "bf16", "F16": "f16"}.get(_checkpoint_dtype(folder), "f32")
            write_gguf(folder, intermediate, source, progress)
            runtime.quantize(intermediate, part, type_name)
        os.replace(part, out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        if not direct:
            intermediate.unlink(missing_ok=True)
    return out


def _checkpoint_dtype(folder: Path) -> str:
    dtypes = {t.dtype for t in list_tensors(folder).values()}
    return dtypes.pop() if len(dtypes) == 1 else "F32"

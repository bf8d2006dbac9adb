"""The expert index against gguf-py's own view of the same files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import TensorClass, classify, open_index


def _whole_tensor(reader: GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return dequantize(t.data, t.tensor_type)


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0", "q4_k", "q6_k"])
def test_expert_block_is_byte_exact_slice(wide_models, qtype):
    path = wide_models[qtype]
    index = open_index(path)
    reader = GGUFReader(path)
    raw = np.memmap(path, mode="r")
    for proj in ("gate", "up", "down"):
        blocks = [b for b in index.experts if b.layer == 1 and b.proj == proj]
        assert [b.expert for b in blocks] == list(range(index.params.n_expert))
        block = blocks[5]
        assert block.type.name == qtype.upper()
        whole = _whole_tensor(reader, f"blk.1.ffn_{proj}_exps.weight")  # numpy (expert, rows, cols)
        piece = np.asarray(raw[block.offset:block.offset + block.nbytes])
        if block.type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            piece = piece.view(np.float32 if block.type == GGMLQuantizationType.F32 else np.float16)
        alone = dequantize(piece, block.type).reshape(whole.shape[1:])
        np.testing.assert_array_equal(alone, whole[5])
        assert np.abs(alone).max() > 0


def test_counts_and_bytes_match_gguf_reader(wide_models):
    path = wide_models["q4_k"]
    index = open_index(path)
    reader = GGUFReader(path)
    assert len(index.tensors) == len(reader.tensors)
    by_name = {t.name: t for t in reader.tensors}
    for entry in index.tensors:
        t = by_name[entry.name]
        assert (entry.offset, entry.nbytes, entry.type) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert entry.shape == tuple(int(d) for d in t.shape)
    assert sum(index.bytes_by_class.values()) == sum(int(t.n_bytes) for t in reader.tensors)
    assert index.bytes_by_class["routed_expert"] == sum(b.nbytes for b in index.experts)
    assert index.vram_resident_bytes + index.host_capable_bytes == sum(index.bytes_by_class.values())
    per_layer = sum(sum(v.values()) for v in index.bytes_by_layer.values())
    global_bytes = sum(t.nbytes for t in index.tensors if t.layer is None)
    assert per_layer + global_bytes == sum(index.bytes_by_class.values())


def test_params_from_metadata(tiny_model):
    p = open_index(tiny_model).params
    assert (p.arch, p.n_layer, p.n_expert, p.n_expert_used) == ("qwen3moe", 2, 8, 2)
    assert (p.n_embd, p.n_ff_exp, p.n_head, p.n_head_kv, p.head_dim_k, p.n_vocab) == (64, 32, 4, 2, 16, 1024)


def test_expert_bytes_sum_projections(tiny_model):
    index = open_index(tiny_model)
    per_proj = index.expert_bytes_by_proj
    assert set(per_proj) == {"gate", "up", "down"}
    assert index.expert_bytes(0) == sum(per_proj.values()) == 3 * 64 * 32 * 4
    assert len(index.expert_blocks(1, 7)) == 3


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "llama", "olmoe", "gpt-oss"])
def test_architectures(arch_models, arch):
    index = open_index(arch_models[arch])
    assert index.params.arch == arch
    assert index.moe_layers == (0, 1)
    assert index.bytes_by_class["other"] == 0, [t.name for t in index.tensors if t.cls is TensorClass.OTHER]
    weights = [b for b in index.experts if b.part == "weight"]
    assert len(weights) == 2 * 8 * 3
    assert index.params.n_ff_exp == 32
    if arch == "qwen2moe":
        assert index.bytes_by_class["shared_expert"] > 0 and index.params.n_ff_shexp == 4 * 32
    if arch == "gpt-oss":
        biases = [b for b in index.experts if b.part == "bias"]
        assert len(biases) == 2 * 8 * 3 and index.bytes_by_class["expert_bias"] > 0
        assert index.expert_bytes(0) == sum(b.nbytes for b in index.expert_blocks(0, 0))
        assert classify("blk.3.attn_sinks.weight")[0] is TensorClass.ATTENTION


@pytest.mark.parametrize("name, cls, layer", [
    ("token_embd.weight", TensorClass.TOKEN_EMBEDDING, None),
    ("output.weight", TensorClass.OUTPUT_HEAD, None),
    ("output_norm.weight", TensorClass.NORM, None),
    ("blk.7.attn_qkv.weight", TensorClass.ATTENTION, 7),
    ("blk.7.attn_q_norm.weight", TensorClass.NORM, 7),
    ("blk.7.ffn_gate_inp.weight", TensorClass.ROUTER, 7),
    ("blk.7.exp_probs_b.bias", TensorClass.ROUTER, 7),
    ("blk.7.ffn_gate_inp_shexp.weight", TensorClass.SHARED_EXPERT, 7),
    ("blk.7.ffn_down_shexp.weight", TensorClass.SHARED_EXPERT, 7),
    ("blk.7.ffn_gate_up_exps.weight", TensorClass.ROUTED_EXPERT, 7),
    ("blk.7.ffn_down_exps.bias", TensorClass.EXPERT_BIAS, 7),
    ("blk.7.ffn_down_exps.scale", TensorClass.EXPERT_BIAS, 7),
    ("blk.7.ffn_up_chexps.weight", TensorClass.ROUTED_EXPERT, 7),
    # every expert tensor name of the pinned llama.cpp (src/llama-arch.cpp), newer ones included
    ("blk.7.ffn_gate_exps.weight", TensorClass.ROUTED_EXPERT, 7),
    ("blk.7.ffn_up_exps.input_scale", TensorClass.EXPERT_BIAS, 7),
    ("blk.7.ffn_gate_chexps.weight", TensorClass.ROUTED_EXPERT, 7),
    ("blk.7.ffn_down_chexps.weight", TensorClass.ROUTED_EXPERT, 7),
    ("blk.7.ffn_up_shexp.weight", TensorClass.SHARED_EXPERT, 7),
    ("blk.7.ffn_gate_shexp.weight", TensorClass.SHARED_EXPERT, 7),
    ("blk.7.exp_probs_b_vl.bias", TensorClass.ROUTER, 7),
    ("blk.7.ffn_gate_tid2eid.weight", TensorClass.ROUTER, 7),
    ("blk.7.ffn_norm_exps.weight", TensorClass.NORM, 7),
    ("blk.0.ffn_down.weight", TensorClass.DENSE_FFN, 0),
    ("blk.0.ssm_in.weight", TensorClass.OTHER, 0),
    ("mystery", TensorClass.OTHER, None),
])
def test_classify(name, cls, layer):
    got_cls, got_layer, _, _ = classify(name)
    assert (got_cls, got_layer) == (cls, layer)


def _write_custom(write_gguf, path, tensors, arch="llama", n_expert=4):
    return write_gguf(path, arch, tensors, block_count=1, expert_count=n_expert, expert_used_count=2,
                      embedding_length=32)


def test_fused_gate_up_and_legacy_per_expert_tensors(tmp_path, write_gguf):
    rng = np.random.default_rng(0)
    fused = rng.standard_normal((4, 64, 32), dtype=np.float32)  # numpy order: experts, 2*ff, embd
    legacy = [(f"blk.1.ffn_down.{e}.weight", rng.standard_normal((32, 32), dtype=np.float32)) for e in range(4)]
    path = tmp_path / "custom.gguf"
    _write_custom(write_gguf, path, [("blk.0.ffn_gate_up_exps.weight", fused), *legacy])
    index = open_index(path)
    fused_blocks = [b for b in index.experts if b.proj == "gate_up"]
    assert [b.nbytes for b in fused_blocks] == [64 * 32 * 4] * 4
    raw = np.memmap(path, mode="r")
    b = fused_blocks[2]
    np.testing.assert_array_equal(raw[b.offset:b.offset + b.nbytes].view(np.float32).reshape(64, 32), fused[2])
    down = [b for b in index.experts if b.proj == "down"]
    assert [(b.layer, b.expert) for b in down] == [(1, e) for e in range(4)]
    assert index.params.n_ff_exp == 32


def test_dense_model_is_not_moe(tmp_path, write_gguf):
    path = tmp_path / "dense.gguf"
    _write_custom(write_gguf, path, [("blk.0.ffn_up.weight", np.zeros((64, 32), np.float32))], n_expert=0)
    index = open_index(path)
    assert not index.is_moe
    with pytest.raises(Exception, match="dense model"):
        index.require_moe()


def test_json_has_documented_fields(tiny_model):
    data = open_index(tiny_model).to_json()
    for key in ("arch", "n_layer", "n_expert", "n_expert_used", "bytes_by_class", "expert_bytes", "experts"):
        assert key in data
    block = data["experts"][0]
    assert set(block) >= {"layer", "expert", "proj", "offset", "nbytes", "type"}
    assert data["expert_bytes"] == 3 * 64 * 32 * 4


def test_long_metadata_arrays_keep_their_values(models_dir):
    """The fast path for long arrays must give what gguf-py gives for numeric arrays."""
    from dataclasses import replace

    from rotary_gguf.gguf import _CheckedReader
    from rotary_gguf.synth import PRESETS, synth_model

    path = synth_model(models_dir / "padded.gguf", replace(PRESETS["tiny"], n_vocab=3000), "f32").path
    ours, theirs = _CheckedReader(path), GGUFReader(path)
    key = "tokenizer.ggml.token_type"
    assert ours.fields[key].contents() == theirs.fields[key].contents()
    assert open_index(path).metadata["tokenizer.ggml.tokens"] == "<array of 3000 string>"


def _write_split(src, out_dir, max_tensors):
    """Rewrite a GGUF as llama.cpp's split files (NAME-0000i-of-0000n.gguf) with gguf-py's writer."""
    from gguf import GGUFValueType

    reader = GGUFReader(src)
    writer = GGUFWriter(out_dir / "split.gguf", reader.fields["general.architecture"].contents(),
                        split_max_tensors=max_tensors)
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = fld.types[-1] if fld.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), fld.types[0], sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(out_dir.glob("split-*-of-*.gguf"))


def test_split_model_indexes_every_file(tiny_model, tmp_path, stock_engine):
    from rotary_gguf.errors import MalformedGGUFError

    files = _write_split(tiny_model, tmp_path, max_tensors=10)
    assert len(files) == 3
    whole, split = open_index(tiny_model), open_index(files[0])
    assert split.files == tuple(files) and open_index(files[1]).files == tuple(files)
    assert split.bytes_by_class == whole.bytes_by_class and split.params == whole.params
    raw = {i: np.memmap(f, mode="r") for i, f in enumerate(files)}
    reference = np.memmap(tiny_model, mode="r")
    for a, b in zip(whole.experts, split.experts, strict=True):
        assert (a.layer, a.expert, a.proj) == (b.layer, b.expert, b.proj)
        assert bytes(reference[a.offset:a.offset + a.nbytes]) == bytes(raw[b.file][b.offset:b.offset + b.nbytes])
    assert {b.file for b in split.experts} != {0}
    prompt = "<|im_start|>user\nsplit?<|im_end|>\n"
    split_tokens = stock_engine(files[0], ctx=512).complete(prompt, 6).tokens
    assert split_tokens == stock_engine(tiny_model, ctx=512).complete(prompt, 6).tokens
    files[2].unlink()
    with pytest.raises(MalformedGGUFError, match="missing split-00003-of-00003.gguf"):
        open_index(files[0])


def test_mxfp4_experts_split_byte_exactly(tmp_path, write_gguf):
    """gpt-oss ships its experts in MXFP4 (17-byte blocks of 32): the split is generic over block types."""
    from gguf.quants import quantize

    rng = np.random.default_rng(1)
    values = rng.standard_normal((4, 64, 64), dtype=np.float32)  # experts, rows, cols
    packed = quantize(values, GGMLQuantizationType.MXFP4)
    path = write_gguf(tmp_path / "mxfp4.gguf", "gpt-oss",
                      [("blk.0.ffn_up_exps.weight", packed, GGMLQuantizationType.MXFP4)],
                      block_count=1, expert_count=4, expert_used_count=2)
    index = open_index(path)
    block = index.experts[3]
    assert block.type is GGMLQuantizationType.MXFP4 and block.nbytes == 64 * 64 // 32 * 17
    raw = np.memmap(path, mode="r")
    alone = dequantize(np.asarray(raw[block.offset:block.offset + block.nbytes]), GGMLQuantizationType.MXFP4)
    np.testing.assert_array_equal(alone.reshape(64, 64), dequantize(packed, GGMLQuantizationType.MXFP4)[3])


def test_expert_auxiliary_tensors_of_any_rank(tmp_path, write_gguf):
    """Per-expert scalars ([n_expert], gemma4's down scale) and biases ([n, n_expert]) are per-expert blocks;
    a per-expert slice that is not whole quant blocks is one clear error with the numbers."""
    scale = np.arange(4, dtype=np.float32)
    bias = np.ones((4, 32), dtype=np.float32)
    path = _write_custom(write_gguf, tmp_path / "aux.gguf", [
        ("blk.0.ffn_down_exps.weight", np.zeros((4, 32, 32), np.float32)),
        ("blk.0.ffn_down_exps.scale", scale), ("blk.0.ffn_down_exps.bias", bias)])
    index = open_index(path)
    for expert in range(4):
        parts = {b.part: b for b in index.expert_blocks(0, expert)}
        assert (parts["scale"].nbytes, parts["bias"].nbytes, parts["weight"].nbytes) == (4, 128, 4096)
    assert index.expert_bytes(0) == 4096 + 128 + 4
    quantized = np.zeros(34 * 2, np.uint8)  # Q8_0 [64]: 64 experts of 1 value each, inside 32-value blocks
    bad = _write_custom(write_gguf, tmp_path / "bad.gguf",
                        [("blk.0.ffn_down_exps.scale", quantized, GGMLQuantizationType.Q8_0)], n_expert=64)
    with pytest.raises(RotaryError, match=r"'blk\.0\.ffn_down_exps\.scale' shape \[64\] \(Q8_0\) does not split "
                                          r"into 64 whole-block experts"):
        open_index(bad)

"""`rotary convert` on the newer MoE families (qwen3_5_moe, ...) against the real references: transformers'
logits for the same checkpoint, and llama.cpp's own convert_hf_to_gguf.py tensor for tensor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from rotary_gguf.cli import main
from rotary_gguf.convert import convert
from rotary_gguf.gguf import open_index

IDS = list(range(10, 42))
REFERENCE = Path(__file__).resolve().parents[1] / "scripts" / "reference_convert.py"
# model_type of a conftest family checkpoint -> convert_hf_to_gguf.py's extra arguments for it.
FAMILIES = {"qwen3_5_moe_text": ["--no-mtp"], "glm4_moe": [], "glm4_moe-nextn": [], "gemma4_text": []}
# Families also checked as bf16 checkpoints (written here from the f32 ones), named "<family>-bf16".
BF16 = ("glm4_moe", "gemma4_text")
# Every checkpoint compared tensor for tensor: the conftest families, the multimodal release layouts of Qwen3.5
# and Gemma 4 (qwen3_5_moe, gemma4: written here), the bf16 copies.
ALL = [*FAMILIES, "qwen3_5_moe", "gemma4", *(f"{family}-bf16" for family in BF16)]
# Checkpoints whose logits transformers' AutoModelForCausalLM does not build (the multimodal release).
MODEL_CLASSES = {"qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}


@pytest.fixture(scope="module")
def reference_converter() -> Path:
    from rotary_gguf.plugin_build import llama_cpp_converter

    return llama_cpp_converter()


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            shutil.copy(f, folder / f.name)


def _fuse_experts(state: dict, prefix: str, n_expert: int) -> None:
    """Per-expert gate/up/down tensors under prefix as the fused [experts, 2 x ff, hidden] gate_up_proj and
    [experts, hidden, ff] down_proj that transformers 5 keeps in memory (and some releases store)."""
    import torch

    def take(proj: str) -> list:
        return [state.pop(f"{prefix}.{e}.{proj}.weight") for e in range(n_expert)]

    gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
    state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
    state[f"{prefix}.down_proj"] = torch.stack(down)


@pytest.fixture(scope="module")
def qwen35_release(tmp_path_factory, family_checkpoints) -> Path:
    """The released Qwen3.5/3.6 MoE layout, tiny and bf16: Qwen3_5MoeForConditionalGeneration (text weights
    under model.language_model, a vision tower), interleaved M-RoPE sections, an MTP block (mtp.*: fc,
    pre-fc norms, one full-attention MoE layer) as the release has and transformers does not run, and the
    experts of layers 0-1 and the MTP layer stored fused. The text model's matrices are 4x transformers' init
    (logits up to ~2 rather than ~0.5), a harder comparison."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    text_folder = family_checkpoints("qwen3_5_moe_text")
    text = json.loads((text_folder / "config.json").read_text())
    text = {k: v for k, v in text.items() if k not in ("architectures", "model_type", "dtype", "transformers_version")}
    text["rope_parameters"] = dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.25,
                                   mrope_section=[2, 1, 1], mrope_interleaved=True)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    config.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("qwen35") / "release"
    transformers.Qwen3_5MoeForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state = {k: v * 4 if v.ndim >= 2 and ".visual." not in k else v for k, v in state.items()}
    lm = "model.language_model.layers"
    for name in [n for n in state if n.startswith(f"{lm}.3.")]:
        state[name.replace(f"{lm}.3.", "mtp.layers.0.")] = state[name] + 0.01 * torch.randn_like(state[name])
    hidden = text["hidden_size"]
    state["mtp.fc.weight"] = (0.05 * torch.randn(hidden, 2 * hidden)).to(torch.bfloat16)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        state[f"mtp.{norm}.weight"] = (0.1 * torch.randn(hidden)).to(torch.bfloat16)
    for prefix in (f"{lm}.0.mlp.experts", f"{lm}.1.mlp.experts", "mtp.layers.0.mlp.experts"):
        _fuse_experts(state, prefix, text["num_experts"])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((folder / "config.json").read_text())
    saved["text_config"]["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    _copy_tokenizer(text_folder, folder)
    return folder


@pytest.fixture(scope="module")
def gemma4_release(tmp_path_factory, family_checkpoints) -> Path:
    """The released Gemma 4 layout, tiny and bf16: Gemma4ForConditionalGeneration (model_type gemma4, the text
    model of conftest's gemma4_text under model.language_model, a vision tower and its embedder)."""
    import torch
    import transformers

    text_folder = family_checkpoints("gemma4_text")
    text = json.loads((text_folder / "config.json").read_text())
    text = {k: v for k, v in text.items() if k not in ("architectures", "model_type", "dtype", "transformers_version")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, position_embedding_size=64, patch_size=4)
    config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                                       tie_word_embeddings=True)
    config.architectures = ["Gemma4ForConditionalGeneration"]
    torch.manual_seed(4)
    folder = tmp_path_factory.mktemp("gemma4") / "release"
    transformers.Gemma4ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(folder)
    _copy_tokenizer(text_folder, folder)
    return folder


@pytest.fixture(scope="module")
def bf16_checkpoints(family_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """glm4_moe and gemma4_text stored in bf16 (the conftest checkpoints are f32), as their releases are."""
    import torch
    from safetensors.torch import load_file, save_file

    made = {}
    for family in BF16:
        source = family_checkpoints(family)
        folder = Path(shutil.copytree(source, tmp_path_factory.mktemp("bf16") / family))
        state = {k: v.to(torch.bfloat16) for k, v in load_file(source / "model.safetensors").items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        made[f"{family}-bf16"] = folder
    return made


@pytest.fixture(scope="module")
def checkpoint(family_checkpoints, qwen35_release, gemma4_release, bf16_checkpoints) -> Callable[[str], Path]:
    """checkpoint(name) -> the folder of any checkpoint in ALL."""
    written = {"qwen3_5_moe": qwen35_release, "gemma4": gemma4_release, **bf16_checkpoints}
    return lambda name: written[name] if name in written else family_checkpoints(name)


def _llama_logits(stock_engine, path: Path) -> np.ndarray:
    with stock_engine(path, ctx=256, threads=2, kv_cache_type="f32", flash_attention=False, batch=512) as engine:
        engine.complete(IDS, 0)
        return engine.logits()


def _transformers_logits(folder: Path, model_type: str) -> np.ndarray:
    import torch
    import transformers

    model_class = getattr(transformers, MODEL_CLASSES.get(model_type, "AutoModelForCausalLM"))
    model = model_class.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0, -1].numpy()


# Runs scripts/reference_convert.py once per "folder,qtype,outfile[,extra...]" argument in one process (torch
# and the converter are imported once). `--no-mtp` sets a class attribute of the converter for the rest of
# the process, so those runs go last.
_REFERENCE_RUNS = """
import runpy, sys
script, root = sys.argv[1:3]
for spec in sys.argv[3:]:
    folder, qtype, out, *extra = spec.split(",")
    sys.argv = [script, root, folder, "--outtype", qtype, "--outfile", out, *extra]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code:
            raise
"""
QTYPES = ("f16", "q8_0")


@pytest.fixture(scope="module")
def references(reference_converter, checkpoint, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(family, qtype) -> the checkpoint converted by llama.cpp's convert_hf_to_gguf.py, in two parallel
    processes. The multimodal releases are converted with llama.cpp's defaults (MTP kept)."""
    folder = tmp_path_factory.mktemp("references")
    outs = {(family, q): folder / f"{family}-{q}.gguf" for family in ALL for q in QTYPES}
    jobs = sorted(outs, key=lambda job: bool(FAMILIES.get(job[0])))  # the ones with arguments last
    runs = []
    for share in (jobs[0::2], jobs[1::2]):
        specs = [",".join([str(checkpoint(family)), q, str(outs[(family, q)]), *FAMILIES.get(family, [])])
                 for family, q in share]
        command = [sys.executable, "-c", _REFERENCE_RUNS, str(REFERENCE), str(reference_converter), *specs]
        runs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for run in runs:
        _, err = run.communicate()
        assert run.returncode == 0, err[-2000:]
    return outs


def _assert_same_tensors(ours: Path, reference: Path) -> None:
    """Tensors identical (names, types, shapes, bytes), and every architecture key of the reference equal."""
    ours_file, reference_file = GGUFReader(ours), GGUFReader(reference)
    arch = reference_file.fields["general.architecture"].contents()
    for key, field in reference_file.fields.items():
        if key.startswith(f"{arch}."):
            assert key in ours_file.fields and ours_file.fields[key].contents() == field.contents(), key
    theirs = {t.name: t for t in reference_file.tensors}
    mine = {t.name: t for t in ours_file.tensors}
    assert set(mine) == set(theirs)
    for name, t in theirs.items():
        assert (mine[name].tensor_type, list(mine[name].shape)) == (t.tensor_type, list(t.shape)), name
        assert np.array_equal(np.asarray(mine[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name


@pytest.mark.parametrize("family", ["qwen3_5_moe_text", "glm4_moe", "qwen3_5_moe", "glm4_moe-bf16", "glm4_moe-nextn"])
def test_f32_logits_match_transformers(checkpoint, stock_engine, tmp_path, family):
    folder = checkpoint(family)
    out = convert(folder, tmp_path / "model.gguf", "f32")
    assert np.abs(_llama_logits(stock_engine, out) - _transformers_logits(folder, family)).max() <= 1e-4


def _fp16_gelu(model) -> None:
    """llama.cpp's CPU GELU in the model: the input rounded to fp16, ggml's fp16 table value (GELU of that
    input, rounded to fp16), and x <= -10 -> 0, x >= 10 -> x (ggml_vec_geglu_f32 under GGML_GELU_FP16)."""
    import torch

    class Fp16Gelu(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
            return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    for module in model.modules():
        if hasattr(module, "act_fn"):
            module.act_fn = Fp16Gelu()


def test_gemma4_f32_logits_match_transformers_to_llama_cpp_fp16_gelu(family_checkpoints, stock_engine, tmp_path):
    """llama.cpp's CPU GELU goes through an fp16 table, so gemma4 (GELU MLP and experts) cannot meet 1e-4
    against transformers' f32 GELU: measured 3.3e-4 (the tiny checkpoint, logits up to 0.51). With that
    rounding reproduced in transformers the difference is 5.2e-5, under the 1e-4 bar: the rest is exact."""
    import torch
    import transformers

    folder = family_checkpoints("gemma4_text")
    llama = _llama_logits(stock_engine, convert(folder, tmp_path / "model.gguf", "f32"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        exact = model(torch.tensor([IDS])).logits[0, -1].numpy()
        _fp16_gelu(model)
        rounded = model(torch.tensor([IDS])).logits[0, -1].numpy()
    assert np.abs(llama - rounded).max() <= 1e-4
    assert np.abs(llama - exact).max() <= 1e-3


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("family", ALL)
def test_tensors_equal_llama_cpp_converter(checkpoint, references, tmp_path, family, qtype):
    folder = checkpoint(family)
    _assert_same_tensors(convert(folder, tmp_path / "ours.gguf", qtype), references[(family, qtype)])


def test_qwen35_release_text_model_and_mtp_block(qwen35_release, tmp_path, caplog):
    caplog.set_level("INFO")
    out = convert(qwen35_release, tmp_path / "out.gguf", "q8_0")
    assert caplog.text.count("skipping 21 tensors of the vision/audio towers") == 1
    index = open_index(out)
    assert index.metadata["qwen35moe.block_count"] == 5 and index.metadata["qwen35moe.nextn_predict_layers"] == 1
    assert list(index.metadata["qwen35moe.rope.dimension_sections"]) == [2, 1, 1, 0]
    assert not any(t.name.startswith(("v.", "mm.")) for t in index.tensors)


def test_gemma4_release_text_model(gemma4_release, tmp_path, caplog):
    caplog.set_level("INFO")
    index = open_index(convert(gemma4_release, tmp_path / "out.gguf", "q8_0"))
    assert caplog.text.count("skipping 16 tensors of the vision/audio towers") == 1
    assert index.metadata["general.architecture"] == "gemma4" and index.metadata["gemma4.block_count"] == 4


def test_qwen35_bad_layer_types_is_one_line(family_checkpoints, tmp_path):
    folder = Path(shutil.copytree(family_checkpoints("qwen3_5_moe_text"), tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = config["layer_types"][:3]
    (folder / "config.json").write_text(json.dumps(config))
    out = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "out.gguf")])
    assert out.exit_code == 2 and "layer_types has 3 entries; num_hidden_layers is 4" in out.stderr
    assert out.stderr.count("\n") == 1 and not list(tmp_path.glob("out.gguf*"))


@pytest.mark.parametrize("family, message", [
    ("deepseek_v4", "model_type 'deepseek_v4' is not converted by rotary: its release stores the routed experts"),
    ("gemma4_dense", "gemma4_text without enable_moe_block is a dense model"),
])
def test_refused_families_are_one_line_and_write_nothing(family_checkpoints, tmp_path, family, message):
    if family == "gemma4_dense":
        folder = Path(shutil.copytree(family_checkpoints("gemma4_text"), tmp_path / "hf"))
        config = json.loads((folder / "config.json").read_text())
        config["enable_moe_block"] = False
        (folder / "config.json").write_text(json.dumps(config))
    else:
        folder = family_checkpoints(family)
    out = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "out.gguf")])
    assert out.exit_code == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not list(tmp_path.glob("out.gguf*"))


def test_qwen35_fused_experts_that_contradict_the_config_are_one_line(qwen35_release, tmp_path):
    folder = Path(shutil.copytree(qwen35_release, tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    out = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "out.gguf")])
    message = "layers.0.mlp.experts.down_proj: shape [8, 64, 32]; config.json implies [8, 64, 48]"
    assert out.exit_code == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not list(tmp_path.glob("out.gguf*"))


QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("family, split, added, expected", [
    ("qwen3_5_moe_text", QWEN35_SPLIT, {}, {"tokenizer.ggml.pre": "qwen35"}),
    ("glm4_moe", LLAMA3_SPLIT, {1: "[gMASK]", 2: "<|user|>"},
     {"tokenizer.ggml.pre": "glm4", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eot_token_id": 2,
      "tokenizer.ggml.unknown_token_id": 0}),
])
def test_family_vocabulary_as_llama_cpp_names_it(family_checkpoints, tmp_path, family, split, added, expected):
    """Qwen3.5's split (letters with marks) is llama.cpp's qwen35; GLM's llama-bpe split is its glm4, with
    [gMASK] as BOS, <|user|> as EOT and <|endoftext|> as UNK, as convert_hf_to_gguf.py sets them."""
    folder = Path(shutil.copytree(family_checkpoints(family), tmp_path / "hf"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = split
    for token in tokenizer["added_tokens"]:
        token["content"] = added.get(token["id"], token["content"])
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    metadata = open_index(convert(folder, tmp_path / "out.gguf", "q8_0")).metadata
    assert {key: metadata.get(key) for key in expected} == expected


def _sentencepiece_style_tokenizer(folder: Path) -> None:
    """A tokenizer.json of the Gemma release's kind in folder: BPE over "▁"-joined text with byte fallback
    (<0x00>..<0xFF>), its special tokens, a GemmaTokenizer config; the size of the model's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    n_vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<|channel>"]
    vocab = {text: i for i, text in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256))])}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("a", "n"), ("▁a", "n"), ("o", "n")]
    for text in [*"▁abcdefghijklmnopqrstuvwxyzT.,", *(a + b for a, b in merges)]:
        vocab.setdefault(text, len(vocab))
    vocab.update({f"tok{i}": i for i in range(len(vocab), n_vocab)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in specials])
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            f.unlink()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="GemmaTokenizer", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>", add_bos_token=True, add_eos_token=False,
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])))


def test_gemma4_release_tokenizer_as_llama_cpp_writes_it(family_checkpoints, reference_converter, stock_engine,
                                                          tmp_path):
    """A SentencePiece-style tokenizer.json becomes llama.cpp's gemma4 vocabulary: every tokenizer.* key equal
    to what convert_hf_to_gguf.py writes (run here without the test vocabulary hook), the same tensors, and
    llama.cpp's tokenization equal to transformers' (byte fallback and special tokens included)."""
    import transformers

    folder = Path(shutil.copytree(family_checkpoints("gemma4_text"), tmp_path / "hf"))
    _sentencepiece_style_tokenizer(folder)
    reference = tmp_path / "reference.gguf"
    done = subprocess.run([sys.executable, str(reference_converter / "convert_hf_to_gguf.py"), str(folder),
                           "--outtype", "q8_0", "--outfile", str(reference)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(reference_converter / "gguf-py")})
    assert done.returncode == 0, done.stderr[-2000:]
    ours = convert(folder, tmp_path / "ours.gguf", "q8_0")
    _assert_same_tensors(ours, reference)
    mine, theirs = GGUFReader(ours).fields, GGUFReader(reference).fields
    assert {k for k in mine if k.startswith("tokenizer.")} == {k for k in theirs if k.startswith("tokenizer.")}
    for key in (k for k in theirs if k.startswith("tokenizer.")):
        assert mine[key].contents() == theirs[key].contents(), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    engine = stock_engine(ours, ctx=256, threads=2)
    for text in ("the answer is on the table", "Tea, then an ant.", "héllo wörld<end_of_turn>"):
        assert engine.tokenize(text) == tokenizer(text).input_ids, text

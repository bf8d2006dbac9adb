"""Fixtures shared by every test module: tiny synthetic models generated into a session temp folder and run
by the real llama.cpp, engines that close at teardown, a private cache, and the `gpu` marker.

Test modules take these as fixtures; nothing imports from conftest."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGUFWriter

from rotary_gguf.gguf import open_index
from rotary_gguf.plan import plan_placement, rotary_scratch_bytes
from rotary_gguf.profile import Profile, load_profile
from rotary_gguf.runtime import Engine, EngineOptions, gpu_device_name, quantize
from rotary_gguf.synth import ARCHITECTURES, PRESETS, ModelSpec, synth_model
from rotary_gguf.synth.spec import for_arch

TINY = PRESETS["tiny"]
# Rows of 256 so that every type, K-quants included, stores the experts without fallback.
WIDE = replace(TINY, n_embd=256, n_ff_exp=256, head_dim=64)
ARCH_SPECS: dict[str, ModelSpec] = {arch: for_arch(TINY, arch) for arch in ARCHITECTURES}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped unless this llama.cpp build has a GPU backend."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    if gpu_device_name() is None:
        skip = pytest.mark.skip(reason="needs a GPU backend; this llama.cpp build has none")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def rotary_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """ROTARY_CACHE is one temp folder for the whole session, set before any other fixture runs: tests never
    write into the user's cache, and what they download or build there happens at most once per session.
    A test may point it elsewhere with monkeypatch; the session folder is back after that test."""
    folder = tmp_path_factory.mktemp("rotary-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROTARY_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    return synth_model(models_dir / "tiny-f32.gguf", TINY, "f32", seed=1).path


@pytest.fixture(scope="session")
def wide_models(models_dir: Path) -> dict[str, Path]:
    """The WIDE spec in each ggml type the index must split byte-exactly."""
    return {q: synth_model(models_dir / f"wide-{q}.gguf", WIDE, q, seed=2).path
            for q in ("f32", "f16", "q8_0", "q4_0", "q4_k", "q6_k")}


@pytest.fixture(scope="session")
def arch_models(models_dir: Path) -> dict[str, Path]:
    return {arch: synth_model(models_dir / f"{arch}.gguf", spec, "q8_0", seed=3).path
            for arch, spec in ARCH_SPECS.items()}


@pytest.fixture(scope="session")
def wide_arch_models(models_dir: Path) -> dict[tuple[str, str], Path]:
    """Every architecture layout at rows of 256: F32 and Q8_0 written directly, and Q4_K_M made from the
    F32 file by llama.cpp's own quantizer (Q4_K with Q6_K down projections in some layers):
    (arch, type) -> path."""
    models = {}
    for arch in ARCHITECTURES:
        for q in ("f32", "q8_0"):
            models[(arch, q)] = synth_model(models_dir / f"wide-{arch}-{q}.gguf", for_arch(WIDE, arch), q, seed=7).path
        models[(arch, "q4_k_m")] = models_dir / f"wide-{arch}-q4_k_m.gguf"
        quantize(models[(arch, "f32")], models[(arch, "q4_k_m")], "q4_k_m", n_threads=2)
    return models


@pytest.fixture(scope="session")
def small_model(models_dir: Path) -> Path:
    """The `small` preset at its default type (Q4_K, ~140 MB): for memory and speed checks."""
    return synth_model(models_dir / "small-q4_k.gguf", PRESETS["small"], "q4_k", seed=5).path


@pytest.fixture(scope="session")
def real_shapes_header(models_dir: Path) -> Path:
    """The qwen3-30b-a3b preset as a sparse file: a real-shaped index without 17 GB on disk."""
    return synth_model(models_dir / "q30-sparse.gguf", PRESETS["qwen3-30b-a3b"], "q4_k", sparse=True).path


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotary scheduler on its CPU stand-in device (a second CPU backend in place of a GPU)."""
    monkeypatch.setenv("ROTARY_SCHED_DEVICE", "cpu")


@pytest.fixture
def prompt_ids() -> list[int]:
    """48 tokens of the embedded vocabulary: one prompt batch."""
    return list(range(10, 58))


@pytest.fixture
def open_engine() -> Iterator[Callable[..., Engine]]:
    """open_engine(path, profile="cpu-only", placement="experts-on-host", **option_fields) -> Engine:
    Engine.open with EngineOptions(**option_fields) (unset fields are the profile's); every engine it
    opened is closed at teardown."""
    with contextlib.ExitStack() as opened:
        def open_(path: Path, profile: Profile | str = "cpu-only", placement: str = "experts-on-host",
                  **option_fields: object) -> Engine:
            engine = Engine.open(path, profile, placement, EngineOptions(**option_fields))
            opened.callback(engine.close)
            return engine

        yield open_


@pytest.fixture
def stock_engine(open_engine: Callable[..., Engine]) -> Callable[..., Engine]:
    """stock_engine(path, **option_fields) -> Engine as llama.cpp loads a model by itself: every tensor on the
    CPU, the experts in llama.cpp's CPU repacking buffers (cpu-only, experts-on-host, repack=True); closed
    at teardown."""
    def open_stock(path: Path, **option_fields: object) -> Engine:
        return open_engine(path, "cpu-only", "experts-on-host", repack=True, **option_fields)

    return open_stock


def _write_gguf(path: Path, arch: str, tensors: list, **hparams: object) -> Path:
    writer = GGUFWriter(path, arch)
    for key, value in hparams.items():
        getattr(writer, f"add_{key}")(value)
    for name, array, *raw_type in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_type[0] if raw_type else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def write_gguf() -> Callable[..., Path]:
    """write_gguf(path, arch, tensors, **hparams) -> path: a small GGUF written with gguf-py; `hparams` name
    GGUFWriter.add_* calls (block_count=4 calls add_block_count(4)); `tensors` are (name, array) or
    (name, raw bytes array, ggml type)."""
    return _write_gguf


def _budget_for_slots(path: Path, slots: int, ctx: int = 256) -> int:
    index = open_index(path)
    fixed = plan_placement(index, load_profile("rtx4060-laptop-8gb"), strategy="experts-on-host", ctx=ctx)
    per_slot = sum(map(index.slot_bytes, index.moe_layers))
    return fixed.predicted_vram_bytes + rotary_scratch_bytes(index) + slots * per_slot


@pytest.fixture
def slot_budget() -> Callable[..., int]:
    """slot_budget(path, slots, ctx=256) -> bytes: the VRAM budget (rtx4060-laptop-8gb profile) whose rotary
    plan holds `slots` experts per layer."""
    return _budget_for_slots


# Tiny random checkpoints of the newer MoE families, written by transformers from a config (the shapes
# here), with the embedded BPE tokenizer; converted to GGUF by llama.cpp's own convert_hf_to_gguf.py.
_QWEN3_5_MOE_TEXT = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, max_position_embeddings=4096, tie_word_embeddings=False)
_GLM4_MOE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, num_nextn_predict_layers=0, use_qk_norm=True,
    max_position_embeddings=4096, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
FAMILY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    # model_type: (transformers config class, architecture, tiny shapes)
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", _QWEN3_5_MOE_TEXT),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", _GLM4_MOE),
    "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, enable_moe_block=True, num_experts=8, top_k_experts=2,
        moe_intermediate_size=32, sliding_window=32, vocab_size_per_layer_input=0, hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=4096, tie_word_embeddings=True)),
    # glm4_moe with one NextN/MTP block after its 3 layers (written by transformers as a 4th layer; the
    # converter's names for the NextN projections and norms are added by _release_layout)
    "glm4_moe-nextn": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        _GLM4_MOE, num_hidden_layers=4, num_nextn_predict_layers=1)),
    # qwen3_5_moe_text with a recurrent state large enough (0.41 MiB) to compare with llama.cpp's log to 1%
    "qwen3_5_moe_text-wide-state": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        _QWEN3_5_MOE_TEXT, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
        linear_value_head_dim=64)),
    # The converter reads the release's layout (names, MXFP4 experts, config keys: the tables below);
    # deepseek4.cpp needs hc_mult 4, compression ratios 4 and 128, and (measured) a 64-wide rotary part.
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(
        hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=128, q_lora_rank=64, o_lora_rank=64, o_groups=2, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, hc_mult=4, sliding_window=16, index_n_heads=4, index_head_dim=128, index_topk=16,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                     "heavily_compressed_attention", "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], num_nextn_predict_layers=0, partial_rotary_factor=0.5,
        max_position_embeddings=4096, tie_word_embeddings=False)),
}
# Keys of the released config.json that convert_hf_to_gguf.py reads but transformers' config class does not write
# (DeepSeek-V4's converter reads the original release's names).
FAMILY_CONFIG_JSON: dict[str, dict] = {
    "glm4_moe-nextn": dict(num_hidden_layers=3, num_nextn_predict_layers=1),
    "deepseek_v4": dict(num_hash_layers=1, qk_rope_head_dim=64, compress_ratios=[128, 4, 128, 4]),
}
# Tensor names of the released checkpoint where transformers writes others (regex, replacement; in order):
# DeepSeek-V4's converter reads the release's own layout.
FAMILY_RELEASE_NAMES: dict[str, list[tuple[str, str]]] = {
    "deepseek_v4": [(r"^model\.", ""), (r"^embed_tokens\.", "embed."), (r"^hc_head\.hc_", "hc_head_"),
                    (r"\.attn\.norm\.", ".attn.kv_norm.")],
}
# Extra arguments of convert_hf_to_gguf.py per family (the release's MTP block is not in a tiny checkpoint).
FAMILY_CONVERT_ARGS: dict[str, list[str]] = {
    "qwen3_5_moe_text": ["--no-mtp"], "qwen3_5_moe_text-wide-state": ["--no-mtp"]}


def _release_layout(path: Path, model_type: str) -> None:
    """Rewrite the checkpoint's tensors as the release stores them (names; DeepSeek-V4's routed experts as
    MXFP4 codes and E8M0 group exponents, random like the rest)."""
    import re

    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    for pattern, replacement in FAMILY_RELEASE_NAMES.get(model_type, []):
        tensors = {re.sub(pattern, replacement, name): t for name, t in tensors.items()}
    if model_type == "glm4_moe-nextn":
        # the 4th layer becomes the NextN block: its own projection of [embedding, hidden] and norms
        n_embd = tensors["model.embed_tokens.weight"].shape[1]
        tensors["model.layers.3.eh_proj.weight"] = torch.randn(n_embd, 2 * n_embd) * 0.02
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            tensors[f"model.layers.3.{norm}.weight"] = torch.ones(n_embd)
    if model_type == "deepseek_v4":
        for name in [n for n in tensors if re.search(r"\.ffn\.experts\.\d+\.w[123]\.weight$", n)]:
            rows, cols = tensors[name].shape
            tensors[name] = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8)
            tensors[name.removesuffix(".weight") + ".scale"] = torch.randint(120, 125, (rows, cols // 32),
                                                                              dtype=torch.uint8)
    save_file(tensors, path, metadata={"format": "pt"})


def _family_checkpoint(model_type: str, out: Path, seed: int = 0) -> Path:
    import shutil

    import torch
    import transformers

    from rotary_gguf.synth.hf import write_hf_checkpoint
    from rotary_gguf.synth.vocab import embedded_vocabulary

    config_class, architecture, shapes = FAMILY_CONFIGS[model_type]
    config = getattr(transformers, config_class)(vocab_size=len(embedded_vocabulary().tokens), **shapes)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    if model_type in FAMILY_RELEASE_NAMES or model_type == "glm4_moe-nextn":
        _release_layout(out / "model.safetensors", model_type)
    if model_type in FAMILY_CONFIG_JSON:
        config_json = out / "config.json"
        config_json.write_text(json.dumps({**json.loads(config_json.read_text()), **FAMILY_CONFIG_JSON[model_type]}))
    tokenizer = out / "_tokenizer"
    write_hf_checkpoint(tokenizer, "qwen3_moe", dtype="f32")
    for f in tokenizer.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    shutil.rmtree(tokenizer)
    return out


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family_checkpoints(model_type) -> the folder of a tiny random HF checkpoint (written once)."""
    folder = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = _family_checkpoint(model_type, folder / model_type)
        return made[model_type]

    return get


@pytest.fixture(scope="session")
def family_models(family_checkpoints: Callable[[str], Path], models_dir: Path) -> Callable[[str], Path]:
    """family_models(model_type) -> that checkpoint as an F32 GGUF made by llama.cpp's convert_hf_to_gguf.py."""
    import subprocess
    import sys

    from rotary_gguf.plugin_build import llama_cpp_converter

    reference = Path(__file__).resolve().parents[1] / "scripts" / "reference_convert.py"
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            out = models_dir / f"family-{model_type}-f32.gguf"
            command = [sys.executable, str(reference), str(llama_cpp_converter()), str(family_checkpoints(model_type)),
                       "--outtype", "f32", "--outfile", str(out), *FAMILY_CONVERT_ARGS.get(model_type, [])]
            done = subprocess.run(command, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
            made[model_type] = out
        return made[model_type]

    return get

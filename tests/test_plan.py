"""The planner: properties on real-shaped indexes, and its numbers against llama.cpp's own accounting."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rotary_gguf.gguf import TensorClass, open_index
from rotary_gguf.plan import (
    PlanError,
    compute_buffer_bytes,
    estimate_decode_tok_s,
    kv_cache_bytes,
    plan_placement,
    recurrent_state_bytes,
)
from rotary_gguf.profile import load_profile

GiB = 2**30
LAPTOP = load_profile("rtx4060-laptop-8gb")


def test_never_over_budget_and_monotone(real_shapes_header):
    index = open_index(real_shapes_header)
    big = replace(LAPTOP, vram_total_bytes=80 * GiB)
    previous = -1
    for tenths in range(20, 200, 3):
        budget = tenths * GiB // 10
        placement = plan_placement(index, big, vram_budget=budget)
        assert placement.predicted_vram_bytes <= budget
        assert len(placement.gpu_expert_layers) >= previous
        previous = len(placement.gpu_expert_layers)
    assert previous == 48  # 20 GiB holds every expert
    assert plan_placement(index, big, vram_budget=20 * GiB).overrides == ()


def test_layer_fill_at_laptop_budget(real_shapes_header):
    index = open_index(real_shapes_header)
    placement = plan_placement(index, LAPTOP)
    assert placement.gpu_expert_layers == tuple(range(len(placement.gpu_expert_layers)))
    assert 8 <= len(placement.gpu_expert_layers) <= 20
    assert placement.n_gpu_layers == 49
    # everything not in VRAM is in the mmap: the host weights are the experts left and the embedding
    embedding = index.bytes_by_class[TensorClass.TOKEN_EMBEDDING.value]
    cpu_layers = [i for i in index.moe_layers if i not in placement.gpu_expert_layers]
    assert placement.host_weight_bytes == embedding + sum(index.bytes_by_layer[i]["routed_expert"] for i in cpu_layers)
    last = plan_placement(index, LAPTOP, layer_order="last")
    assert last.gpu_expert_layers == tuple(range(48 - len(last.gpu_expert_layers), 48))
    assert estimate_decode_tok_s(index, placement, LAPTOP) > estimate_decode_tok_s(
        index, plan_placement(index, LAPTOP, strategy="experts-on-host"), LAPTOP)


def test_override_pattern_selects_exactly_the_host_experts(real_shapes_header):
    index = open_index(real_shapes_header)
    placement = plan_placement(index, LAPTOP)
    (override,) = placement.overrides
    assert override.buffer == "CPU"
    pattern = re.compile(override.pattern)  # the same ECMAScript-compatible syntax std::regex runs
    matched = {t.name for t in index.tensors if pattern.search(t.name)}
    expected = {t.name for t in index.tensors
                if t.cls is TensorClass.ROUTED_EXPERT and t.layer not in placement.gpu_expert_layers}
    assert matched == expected
    on_host = plan_placement(index, LAPTOP, strategy="experts-on-host")
    assert on_host.gpu_expert_layers == ()
    assert sum(bool(re.search(on_host.overrides[0].pattern, t.name)) for t in index.tensors) == 48 * 3


def test_impossible_budget_fails_with_numbers_and_hint(real_shapes_header):
    index = open_index(real_shapes_header)
    small = load_profile("rtx3050-laptop-4gb")
    with pytest.raises(PlanError, match=r"needs \d+\.\d\d GiB .* at ctx 40960.*budget 3\.20 GiB; try --ctx \d+"):
        plan_placement(index, small, ctx=40960)
    message = str(pytest.raises(PlanError, plan_placement, index, small, ctx=40960).value)
    suggested = int(message.rsplit("--ctx ", 1)[1])
    assert plan_placement(index, small, ctx=suggested).predicted_vram_bytes <= small.vram_budget_bytes
    with pytest.raises(PlanError):
        plan_placement(index, small, ctx=suggested + 256)
    with pytest.raises(PlanError, match="smaller model"):
        plan_placement(index, LAPTOP, vram_budget=GiB)
    with pytest.raises(PlanError, match="beyond the model's training context"):
        plan_placement(index, LAPTOP, ctx=65536)
    with pytest.raises(PlanError, match="more than the GPU's 8.00 GiB"):
        plan_placement(index, LAPTOP, vram_budget=9 * GiB)


def test_cpu_only_keeps_experts_in_the_mmap(tiny_model):
    index = open_index(tiny_model)
    placement = plan_placement(index, load_profile("cpu-only"))
    assert placement.predicted_vram_bytes == 0 and placement.n_gpu_layers == 0
    assert placement.host_weight_bytes == sum(index.bytes_by_class.values())
    assert len(placement.overrides) == 1


def test_dense_model_places_whole_layers(tmp_path, write_gguf):
    zeros = np.zeros
    tensors = [("token_embd.weight", zeros((1000, 64), np.float32)), ("output.weight", zeros((1000, 64), np.float32))]
    tensors += [(f"blk.{i}.ffn_up.weight", zeros((4096, 64), np.float32)) for i in range(4)]
    path = write_gguf(tmp_path / "dense.gguf", "llama", tensors, block_count=4, embedding_length=64,
                      head_count=4, head_count_kv=4, context_length=4096)
    index = open_index(path)
    tiny_gpu = replace(LAPTOP, gpu_overhead_bytes=0, vram_budget_bytes=0)
    placement = plan_placement(index, tiny_gpu, vram_budget=7 * 2**20, ctx=512)
    assert placement.dense and 0 < placement.n_gpu_layers < 4
    assert placement.predicted_vram_bytes <= 7 * 2**20


@pytest.mark.parametrize("ctx, kv_type", [(512, "f16"), (2048, "f32")])
def test_kv_cache_matches_llama_cpp(arch_models, stock_engine, ctx, kv_type):
    for arch in ("qwen3moe", "qwen2moe", "gpt-oss"):
        path = arch_models[arch]
        with stock_engine(path, ctx=ctx, kv_cache_type=kv_type, flash_attention=False) as engine:
            measured = engine.buffer_bytes(kind="KV")
        # llama.cpp logs MiB with two decimals: compare to that precision
        assert abs(measured - kv_cache_bytes(open_index(path), ctx, kv_type)) <= 0.01 * 2**20, arch


def test_quantized_kv_cache_matches_llama_cpp(small_model, stock_engine):
    with stock_engine(small_model, ctx=1024, kv_cache_type="q8_0", flash_attention=True) as engine:
        measured = engine.buffer_bytes(kind="KV")
    assert abs(measured - kv_cache_bytes(open_index(small_model), 1024, "q8_0")) <= 0.01 * 2**20


def test_quantized_kv_needs_divisible_heads(tiny_model):
    with pytest.raises(PlanError, match="divisible by 32"):
        plan_placement(open_index(tiny_model), load_profile("rtx3050-laptop-4gb"))


@pytest.mark.parametrize("ctx, ubatch, flash", [(512, 512, False), (2048, 128, True), (4096, 512, True)])
def test_compute_estimate_errs_high_against_llama_cpp(small_model, stock_engine, ctx, ubatch, flash):
    with stock_engine(small_model, ctx=ctx, batch=512, ubatch=ubatch, flash_attention=flash) as engine:
        measured = engine.buffer_bytes(kind="compute")
    estimate = compute_buffer_bytes(open_index(small_model), ctx, ubatch, flash)
    assert measured <= estimate <= 3.5 * measured


def test_host_rss_within_ten_percent(small_model):
    """Planned host bytes against the RSS a fresh process gains while loading, prompting and decoding
    (`rotary bench` in a subprocess: RSS in a long-lived test process carries freed heap from earlier tests)."""
    command = [str(Path(sys.executable).parent / "rotary"), "bench", str(small_model), "--profile", "cpu-only",
               "--ctx", "2048", "--prompt-tokens", "512", "--tokens", "16", "--placement", "experts-on-host", "--json"]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    (run,) = result["placements"]
    assert all(b["name"] != "CPU_REPACK" for b in run["buffers"])  # the experts stayed in the mmap
    ratio = run["rss_delta_bytes"] / run["predicted_host_bytes"]
    assert 0.9 <= ratio <= 1.1, (run["rss_delta_bytes"], run["predicted_host_bytes"])


def test_kv_cache_counts_only_layers_with_kv_heads(tmp_path, write_gguf):
    """Hybrid models give head_count_kv per layer, 0 for recurrent layers: those hold no KV cache."""
    experts = [(f"blk.{i}.ffn_up_exps.weight", np.zeros((4, 32, 64), np.float32)) for i in range(4)]
    path = write_gguf(tmp_path / "hybrid.gguf", "granitehybrid", experts, block_count=4, embedding_length=64,
                      head_count=4, head_count_kv=[0, 2, 0, 2], key_length=16, value_length=16, expert_count=4,
                      expert_used_count=2)
    index = open_index(path)
    assert index.params.n_head_kv_layers == (0, 2, 0, 2)
    assert kv_cache_bytes(index, 1000, "f16") == 2 * 2 * (16 + 16) * 2 * 1000


def test_real_shape_hybrid_memory(tmp_path, write_gguf):
    """Qwen3.6-35B-A3B's shapes (40 layers, full attention every 4th with 2 KV heads of 256, Gated DeltaNet
    conv 4, 32 value heads of 128, 16 key heads of 128, an MTP block as layer 40): llama.cpp allocates 80 MiB
    of KV and 62.8 MiB of recurrent state at ctx 4096 (f16), 640 MiB of KV at 32768; the MTP block has none
    and no slots. The planner counted 320 MiB of KV in every layer before."""
    experts = [(f"blk.{i}.ffn_up_exps.weight", np.zeros((4, 32, 64), np.float32)) for i in (0, 40)]
    arch = "qwen35moe"
    path = write_gguf(tmp_path / "q36.gguf", arch, experts, block_count=41, embedding_length=2048, head_count=16,
                      head_count_kv=2, key_length=256, value_length=256, expert_count=4, expert_used_count=2,
                      context_length=262144, full_attention_interval=4, ssm_conv_kernel=4, ssm_inner_size=4096,
                      ssm_state_size=128, ssm_group_count=16, nextn_predict_layers=1)
    index = open_index(path)
    assert index.nextn_layers == (40,) and index.moe_layers == (0,)
    assert kv_cache_bytes(index, 4096, "f16") == 80 * 2**20
    assert kv_cache_bytes(index, 32768, "f16") == 640 * 2**20
    assert round(recurrent_state_bytes(index) / 2**20, 1) == 62.8
    placement = plan_placement(index, LAPTOP, strategy="rotary", ctx=4096)
    assert placement.kv_bytes == 80 * 2**20 and placement.state_bytes == recurrent_state_bytes(index)
    assert [layer for layer, _ in placement.expert_slots] == [0]


def test_dense_hybrid_layers_bring_their_own_memory(tmp_path, write_gguf):
    """A dense hybrid model: each layer on the GPU brings its KV cache or its recurrent state, not the first
    layer's KV times the layers."""
    weights = [(f"blk.{i}.ffn_up.weight", np.zeros((64, 64), np.float32)) for i in range(4)]
    path = write_gguf(tmp_path / "dense-hybrid.gguf", "qwen35", weights, block_count=4, embedding_length=64,
                      head_count=4, head_count_kv=2, key_length=32, value_length=32, full_attention_interval=4,
                      ssm_conv_kernel=4, ssm_inner_size=64, ssm_state_size=16, ssm_group_count=2)
    index = open_index(path)
    every = plan_placement(index, replace(LAPTOP, gpu_overhead_bytes=0), vram_budget=64 * 2**20, ctx=1024)
    assert every.dense and every.n_gpu_layers == 4
    assert every.kv_bytes == kv_cache_bytes(index, 1024, "f16") == 2 * 64 * 2 * 1024
    assert every.state_bytes == recurrent_state_bytes(index) == 3 * 4 * (3 * (64 + 2 * 2 * 16) + 16 * 64)

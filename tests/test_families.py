"""The newer MoE families the pinned llama.cpp runs, from tiny checkpoints converted by llama.cpp's own
convert_hf_to_gguf.py: sessions on memory that cannot drop a suffix (qwen35moe's Gated DeltaNet layers)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rotary_gguf.chat import ChatSession
from rotary_gguf.cli import main
from rotary_gguf.gguf import TensorClass, open_index
from rotary_gguf.plan import compressor_state_bytes, kv_cache_bytes, plan_placement, recurrent_state_bytes
from rotary_gguf.profile import load_profile
from rotary_gguf.runtime import Engine, EngineOptions, Sampling, prepare
from rotary_gguf.runtime.generation import can_trim

QWEN35 = "qwen3_5_moe_text"


def test_hybrid_chat_turns_equal_fresh_evaluations(family_models, open_engine):
    """Five turns, one of them regenerated with another message: every reply equals a fresh evaluation of
    the same conversation, and the turns after the first reuse the previous prompt's checkpoint."""
    path = family_models(QWEN35)
    engine = open_engine(path, ctx=1024)
    assert not can_trim(engine._llm)  # hybrid memory: llama.cpp cannot drop the end of it
    fresh = open_engine(path, ctx=1024)
    session = ChatSession(engine, max_reply_tokens=16, temp=0)
    reused = []
    for turn, message in enumerate(["hello there", "and then?", "tell me more", "say it again", "thanks"]):
        if turn == 3:
            del session.messages[-2:]  # regenerate the third turn with another message
        reply = session.send(message, lambda text: None)
        prompt = fresh.tokenize(session.template.render(session.messages[:-1]))
        expected = fresh.complete(prompt, 16, sampling=Sampling(temp=0))
        assert reply.text == expected.text, turn
        reused.append(reply.generation.cached_tokens)
    assert reused[0] == 0 and all(n > 0 for n in reused[1:3]) and reused[4] > 0


def test_hybrid_chat_cli_takes_many_turns(family_models):
    path = family_models(QWEN35)
    result = CliRunner().invoke(main, ["chat", str(path), "--profile", "cpu-only", "--ctx", "512", "-n", "8",
                                       "--temp", "0"], input="hi\nand then?\nmore\n/stats\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "reused from the cache" in result.output


# Per-layer memory, the index, the plugin and the commands on every family the pinned llama.cpp loads from a tiny
# checkpoint.
GLM4, GEMMA4, DEEPSEEK4 = "glm4_moe", "gemma4_text", "deepseek_v4"
GLM4_NEXTN, QWEN35_WIDE_STATE = "glm4_moe-nextn", "qwen3_5_moe_text-wide-state"
LAPTOP = load_profile("rtx4060-laptop-8gb")
PROMPT = list(range(10, 58))


@pytest.mark.parametrize("family, kv_type, flash", [
    (QWEN35, "f16", False), (QWEN35, "q8_0", True), (QWEN35_WIDE_STATE, "f16", True), (GLM4, "f16", True),
    (GLM4_NEXTN, "f16", False), (GEMMA4, "f16", True), (GEMMA4, "f16", False), (DEEPSEEK4, "f16", True),
    (DEEPSEEK4, "q8_0", True),
])
def test_kv_and_recurrent_state_match_llama_cpp(family, kv_type, flash, family_models, stock_engine):
    """Within 2% of llama.cpp's KV, RS and deepseek4 compressor-state buffers (logged in MiB with two decimals:
    that much more), where the planner used to count a KV cache in every layer (recurrent, SWA head sizes,
    NextN blocks, deepseek4's compressed caches) and no state."""
    path = family_models(family)
    index = open_index(path)
    for ctx in (1024, 4096):
        with stock_engine(path, ctx=ctx, kv_cache_type=kv_type, flash_attention=flash) as engine:
            measured = {kind: engine.buffer_bytes(kind=kind) for kind in ("KV", "RS", "state")}
        planned = {"KV": kv_cache_bytes(index, ctx, kv_type, flash_attention=flash),
                   "RS": recurrent_state_bytes(index), "state": compressor_state_bytes(index)}
        for kind in ("KV", "RS", "state"):
            assert abs(planned[kind] - measured[kind]) <= 0.02 * measured[kind] + 0.005 * 2**20, (kind, ctx, planned)
    assert (planned["RS"] > 0) == family.startswith(QWEN35) and (planned["state"] > 0) == (family == DEEPSEEK4)


def test_layer_memory_records_each_layers_kind(family_models):
    qwen = open_index(family_models(QWEN35)).layer_memory
    assert [m.recurrent_bytes > 0 for m in qwen] == [True, True, True, False]  # full attention every 4th layer
    assert [m.kv_k > 0 for m in qwen] == [False, False, False, True]
    gemma = open_index(family_models(GEMMA4)).layer_memory
    assert [m.swa_window for m in gemma] == [32, 32, 32, 0]
    assert [(m.kv_k, m.kv_v) for m in gemma] == [(32, 32)] * 3 + [(64, 64)]  # 2 KV heads of 16 (SWA) or 32
    inspect = CliRunner().invoke(main, ["inspect", str(family_models(QWEN35))])
    assert "layer memory   KV cache in layers 3; recurrent state in 0-2 (16.50 KiB per sequence)" in inspect.output


def test_nextn_block_gets_no_slots_and_no_memory(family_models):
    """llama.cpp skips a NextN/MTP block's tensors for normal decoding: no slots, no VRAM, no KV."""
    index, trunk = open_index(family_models(GLM4_NEXTN)), open_index(family_models(GLM4))
    assert index.nextn_layers == (3,) and index.moe_layers == trunk.moe_layers == (1, 2)
    rotary = plan_placement(index, LAPTOP, strategy="rotary", ctx=1024)
    assert [layer for layer, _ in rotary.expert_slots] == [1, 2]
    assert rotary.gpu_weight_bytes == plan_placement(trunk, LAPTOP, strategy="rotary", ctx=1024).gpu_weight_bytes
    assert rotary.kv_bytes == kv_cache_bytes(trunk, 1024, "f16")
    assert 3 not in plan_placement(index, LAPTOP, ctx=1024).gpu_expert_layers


def test_gemma4_per_expert_scale_splits_into_blocks(family_models):
    """gemma4's blk.N.ffn_down_exps.scale ([n_expert], F32) is one 4-byte block per expert, byte-exact."""
    path = family_models(GEMMA4)
    index = open_index(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for layer in index.moe_layers:
        tensor = next(t for t in index.tensors if t.name == f"blk.{layer}.ffn_down_exps.scale")
        assert tensor.cls is TensorClass.EXPERT_BIAS and tensor.shape == (8,)
        values = np.frombuffer(data[tensor.offset:tensor.offset + tensor.nbytes], dtype=np.float32)
        for expert in range(8):
            (block,) = [b for b in index.expert_blocks(layer, expert) if b.part == "scale"]
            assert (block.proj, block.nbytes) == ("down", 4)
            assert np.frombuffer(data[block.offset:block.offset + 4], dtype=np.float32)[0] == values[expert]


def _open_with_slots(path, strategy: str, slots: int = 0) -> Engine:
    setup = prepare(path, LAPTOP, strategy, EngineOptions(ctx=256, threads=2, vram_budget=4 * 2**30), runnable=False)
    slots_per_layer = tuple((layer, slots) for layer, _ in setup.placement.expert_slots)
    placement = replace(setup.placement, expert_slots=slots_per_layer)
    return Engine.from_setup(replace(setup, placement=placement))


@pytest.mark.parametrize("family", [QWEN35, GLM4, GLM4_NEXTN, GEMMA4, DEEPSEEK4])
def test_plugin_logits_and_tokens_exact(stand_in, family, family_models):
    """On the stand-in device: logits equal with and without the plugin, and greedy tokens equal while
    experts rotate through 3 slots (gemma4's per-expert down scale; a NextN block beside the slots)."""
    path = family_models(family)
    with _open_with_slots(path, "experts-on-host") as host:
        host.evaluate(PROMPT)
        reference = host.logits()
        tokens = host.complete(PROMPT, 24, ignore_eos=True).tokens
    for slots in (0, 3, 8):
        with _open_with_slots(path, "rotary", slots) as rotary:
            rotary.evaluate(PROMPT)
            assert np.abs(rotary.logits() - reference).max() <= 1e-5, slots
            assert rotary.complete(PROMPT, 24, ignore_eos=True).tokens == tokens, slots
            stats = rotary.rotation.layer_stats()
            assert [s.layer for s in stats] == list(open_index(path).moe_layers)
            assert (sum(s.device_pairs for s in stats) > 0) == (slots > 0), slots


@pytest.mark.parametrize("family", [QWEN35, GLM4, GEMMA4, DEEPSEEK4])
def test_calibrate_trace_and_bench_run(stand_in, family, family_models, slot_budget, tmp_path):
    """`rotary calibrate` (with a trace), `rotary simulate` on it and `rotary bench -r 1` with experts
    rotating through 3 slots per layer."""
    path = Path(shutil.copy(family_models(family), tmp_path / "model.gguf"))
    runner = CliRunner()
    done = runner.invoke(main, ["calibrate", str(path), "--profile", "cpu-only", "--threads", "2", "--tokens", "4",
                                "--trace", str(tmp_path / "cal.rtrc")])
    assert done.exit_code == 0, done.output
    simulated = runner.invoke(main, ["simulate", str(tmp_path / "cal.rtrc"), "--slots", "3"])
    assert simulated.exit_code == 0, simulated.output
    budget = slot_budget(path, 3)
    bench = runner.invoke(main, ["bench", str(path), "--profile", "rtx4060-laptop-8gb", "--vram-budget", f"{budget}B",
                                 "--ctx", "256", "--prompt-tokens", "32", "--tokens", "8", "--threads", "2", "-r", "1",
                                 "--placement", "rotary", "--json"])
    assert bench.exit_code == 0, bench.output
    (rotary,) = json.loads(bench.stdout)["placements"]
    moe_layers = open_index(path).moe_layers
    assert rotary["rotary"]["slots"] == {str(layer): 3 for layer in moe_layers}
    assert rotary["expert_reads_device"] + rotary["expert_reads_host"] == 8 * len(moe_layers) * 2


def test_gemma4_plan_run_and_chat(family_models):
    path = str(family_models(GEMMA4))
    runner = CliRunner()
    plan = runner.invoke(main, ["plan", path, "--profile", "rtx4060-laptop-8gb", "--placement", "rotary",
                                "--ctx", "1024"])
    assert plan.exit_code == 0 and "expert slots" in plan.output, plan.output
    run = runner.invoke(main, ["run", path, "--profile", "cpu-only", "-n", "8", "--temp", "0", "hello"])
    assert run.exit_code == 0, run.output
    chat = runner.invoke(main, ["chat", path, "--profile", "cpu-only", "--ctx", "512", "-n", "8", "--temp", "0"],
                         input="hi\nand then?\n/exit\n")
    assert chat.exit_code == 0 and "Traceback" not in chat.output, chat.output

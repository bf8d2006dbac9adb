"""Cross-layer prefetch: the plugin's prediction is the router's own rule, the decisions copy predicted
experts within the budget and switch a badly predicting layer off, traces carry the predictions and read old
files, and on the stand-in a prefetching model computes exactly what llama.cpp computes, with the
simulator reproducing its hits."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from rotary_gguf import rotation
from rotary_gguf.gguf import open_index
from rotary_gguf.profile import load_profile
from rotary_gguf.rotation import LayerShape, Rotator, make_policy
from rotary_gguf.router import Router, read_routers
from rotary_gguf.runtime.scheduler import scheduler_plugin
from rotary_gguf.simulate import simulate
from rotary_gguf.trace import Trace, TraceHeader, read_trace, write_trace

PROFILE = load_profile("rtx4060-laptop-8gb")
TRACES = Path(__file__).resolve().parent.parent / "benchmarks" / "traces"


def _router(rng, n_expert, n_embd, gating="softmax", **parts) -> Router:
    optional = {name: rng.normal(size=n_expert if name != "input_scale" else n_embd).astype(np.float32)
                for name, on in parts.items() if on}
    return Router(0, rng.normal(size=(n_expert, n_embd)).astype(np.float32), 2, gating, **optional)


@pytest.mark.parametrize("gating,parts", [
    ("softmax", {}),
    ("softmax", {"select_bias": True}),
    ("sigmoid", {"select_bias": True}),
    ("sqrt_softplus", {"select_bias": True}),
    ("softmax_weight", {"logit_bias": True}),
    ("softmax", {"input_scale": True, "logit_bias": True}),
])
def test_the_plugins_prediction_is_the_routers_rule(stand_in, tiny_model, gating, parts):
    index = open_index(tiny_model)
    rng = np.random.default_rng(0)
    with scheduler_plugin().open_model(index) as model:
        layer = model.layers[-1]
        router = _router(rng, model.n_expert(layer), index.params.n_embd, gating, **parts)
        router = Router(layer, router.weight, index.params.n_expert_used, gating, router.logit_bias,
                        router.select_bias, router.input_scale)
        model.set_router(layer, router)
        for _ in range(40):
            x = rng.normal(size=index.params.n_embd).astype(np.float32)
            assert model.predict(layer, x).tolist() == router.predict(x).tolist()


def test_routers_are_read_from_the_gguf(tiny_model):
    index = open_index(tiny_model)
    routers = read_routers(index, index.moe_layers)
    assert sorted(routers) == list(index.moe_layers)
    entry = next(t for t in index.tensors if t.name == f"blk.{index.moe_layers[0]}.ffn_gate_inp.weight")
    raw = np.fromfile(tiny_model, dtype=np.float32, count=entry.nbytes // 4, offset=entry.offset)
    first = routers[index.moe_layers[0]]
    assert first.weight.shape == (index.params.n_expert, index.params.n_embd)
    assert np.array_equal(first.weight.reshape(-1), raw) and first.gating == "softmax"
    assert first.n_used == index.params.n_expert_used


def _rotator(slots=4, n_expert=16, budget=None, layers=(0, 1, 2), min_recall=0.6) -> Rotator:
    shapes = {layer: LayerShape(n_expert, 2, slots, 100) for layer in layers}
    old = rotation.PREFETCH_MIN_RECALL
    rotation.PREFETCH_MIN_RECALL = min_recall
    try:
        return Rotator(shapes, make_policy("lru", shapes), lambda: budget, prefetch=True)
    finally:
        rotation.PREFETCH_MIN_RECALL = old


def _ids(*ids: int) -> np.ndarray:
    return np.array(ids, np.int32)


def test_a_prediction_serves_its_own_token():
    r = _rotator()
    r.after_prompt({layer: _ids(0, 1, 2, 3) for layer in (0, 1, 2)})
    assert r.prefetch(1, _ids(9, 2)) == 1  # resident 2 needs no copy
    assert r.slot_of[1][9] >= 0 and r.slot_of[1][2] >= 0  # 9 copied at once; 2 was not evicted for it
    r.after_token({0: _ids(0, 1), 1: _ids(9, 5), 2: _ids(0, 1)})
    c = r.counters[1]
    assert (c.hits, c.prefetches, c.prefetch_hits, c.predicted, c.predicted_right) == (1, 1, 1, 2, 1)
    assert r.counters[0].predicted == 0  # no prediction, no score


def test_prefetch_waits_for_decoding_and_skips_experts_being_copied():
    r = _rotator()
    assert r.prefetch(1, _ids(9, 10)) == 0  # before any prompt: not decoding
    r.after_prompt({layer: _ids(0, 1, 2, 3) for layer in (0, 1, 2)})
    r.after_token({0: _ids(0, 1), 1: _ids(7, 1), 2: _ids(0, 1)})  # 7 missed: admitted, being copied
    assert (1, 7) in {(layer, e) for layer, e, _ in r.pending}
    assert r.prefetch(1, _ids(7, 8)) == 1 and r.slot_of[1][8] >= 0  # 7 arrives anyway; 8 is copied
    assert sorted(e for layer, e, _ in r.pending if layer == 1) == [7]  # never twice
    r.before_prompt()
    assert r.prefetch(2, _ids(12, 13)) == 0


def test_prefetch_and_admissions_share_the_copy_budget():
    r = _rotator(budget=300, layers=(0, 1, 2, 3))  # three experts per token
    r.after_prompt({layer: _ids(0, 1, 2, 3) for layer in range(4)})
    for t in range(30):
        before = len(r.pending) * 100  # admissions of the previous token, landing during this one
        started = sum(r.prefetch(layer, _ids(4 + (t + layer) % 12, 5 + (t + 2 * layer) % 11)) for layer in (1, 2, 3))
        assert before + 100 * started <= 300
        r.after_token({layer: _ids(4 + (t * 3 + layer) % 12, 0) for layer in range(4)})
    assert max(r.copied_per_token) <= 300
    assert sum(c.prefetches for c in r.counters.values()) > 10 and sum(c.admissions for c in r.counters.values())
    # an even share: no layer took the budget whole
    assert min(r.counters[layer].prefetches for layer in (1, 2, 3)) > 0


def test_a_layer_that_predicts_badly_stops_prefetching_until_it_recovers():
    r = _rotator(slots=4, n_expert=32)
    r.after_prompt({layer: _ids(0, 1, 2, 3) for layer in (0, 1, 2)})
    for t in range(12):  # always wrong
        r.prefetch(1, _ids(20 + t % 6, 26 + t % 6))
        r.after_token({0: _ids(0, 1), 1: _ids(10 + t % 4, 14 + t % 4), 2: _ids(0, 1)})
    assert r.recall(1) < 0.6
    off = r.counters[1].prefetches
    r.prefetch(1, _ids(30, 31))
    assert r.counters[1].prefetches == off and r.slot_of[1][30] < 0  # switched off, still scored
    for t in range(12):  # right again
        r.prefetch(1, _ids(10 + t % 4, 14 + t % 4))
        r.after_token({0: _ids(0, 1), 1: _ids(10 + t % 4, 14 + t % 4), 2: _ids(0, 1)})
    assert r.recall(1) > 0.6 and r.counters[1].prefetches > off


def test_traces_carry_predictions_and_version_1_still_reads(tmp_path):
    header = TraceHeader("m", (0, 1), 8, 2, {0: 10, 1: 10})
    steps = [("prompt", {0: _ids(1, 2, 3, 4), 1: _ids(5, 6, 7, 0)}), ("decode", {0: _ids(1, 2), 1: _ids(3, 4)})]
    trace = Trace(header, steps, [{}, {1: _ids(3, 5)}])
    back = read_trace(write_trace(tmp_path / "v2.rtrc", trace))
    assert back.has_predictions and back.predicted(1)[1].tolist() == [3, 5] and back.predicted(1)[0].size == 0
    # The same steps as version 1 wrote them: no prediction blocks.
    body = (tmp_path / "v2.rtrc").read_bytes()
    length = struct.unpack_from("<I", body, 8)[0]
    v1 = bytearray(body[:12 + length])
    struct.pack_into("<H", v1, 4, 1)
    for phase, routing in steps:
        v1 += bytes([0 if phase == "prompt" else 1])
        for layer in (0, 1):
            v1 += struct.pack("<I", len(routing[layer])) + routing[layer].astype(np.uint8).tobytes()
    (tmp_path / "v1.rtrc").write_bytes(bytes(v1))
    old = read_trace(tmp_path / "v1.rtrc")
    assert not old.has_predictions and [p for p, _ in old.steps] == ["prompt", "decode"]
    assert all(np.array_equal(old.steps[i][1][layer], steps[i][1][layer]) for i in (0, 1) for layer in (0, 1))


def test_prefetch_pays_on_the_recorded_trace_and_a_useless_predictor_switches_off():
    trace = read_trace(TRACES / "stdlib-moe.rtrc")
    assert trace.has_predictions
    slot_bytes = trace.header.slot_bytes[trace.header.layers[0]]
    budget = len(trace.header.layers) * slot_bytes  # one expert per layer per token
    history = simulate(trace, 4, "hybrid", PROFILE, budget_bytes=budget)
    prefetched = simulate(trace, 4, "hybrid", PROFILE, budget_bytes=budget, prefetch=True)
    assert prefetched.prediction_recall > 0.6
    assert prefetched.hit_rate > history.hit_rate + 0.03
    # The same trace with predictions drawn at random: the layers switch themselves off.
    rng = np.random.default_rng(0)
    shuffled = Trace(trace.header, trace.steps, [
        {layer: rng.permutation(trace.header.n_expert)[: ids.size].astype(np.int32) for layer, ids in step.items()}
        for step in trace.predictions])
    random = simulate(shuffled, 4, "hybrid", PROFILE, budget_bytes=budget, prefetch=True)
    assert random.prediction_recall < 0.25
    assert random.hit_rate > history.hit_rate - 0.01
    assert random.prefetches_per_token < prefetched.prefetches_per_token / 4


@pytest.fixture(scope="module")
def hybrid_q8(models_dir) -> dict[str, Path]:
    from rotary_gguf.synth import PRESETS, synth_model

    return {name: synth_model(models_dir / f"{name}-q8_0.gguf", PRESETS[name], "q8_0", seed=3).path
            for name in ("qwen35moe-tiny", "gemma4-tiny")}


@pytest.mark.parametrize("preset", ["qwen35moe-tiny", "gemma4-tiny"])
def test_hybrid_families_prefetch_and_compute_exactly(stand_in, hybrid_q8, open_engine, slot_budget, preset):
    """Gated DeltaNet (qwen35moe) and Gemma 4 (scaled router input): two requests, as in a chat."""
    path = hybrid_q8[preset]
    prompts = [list(range(10, 40)), list(range(60, 20, -1))]
    plain = open_engine(path, "rtx4060-laptop-8gb", "experts-on-host", ctx=256, threads=2)
    reference = [plain.complete(p, 32, ignore_eos=True).tokens for p in prompts]
    model = open_engine(path, "rtx4060-laptop-8gb", "rotary", ctx=256, threads=2, policy="lru",
                        vram_budget=slot_budget(path, 2))
    assert [model.complete(p, 32, ignore_eos=True).tokens for p in prompts] == reference
    assert sum(s.prefetches for s in model.rotation.layer_stats()) > 0
    assert model.rotation.rotator.totals().predicted > 0


def test_a_router_that_cannot_be_read_leaves_the_model_running_without_prefetch(stand_in, tiny_model, open_engine,
                                                                                slot_budget, monkeypatch, caplog):
    """A router of a shape that does not fit is refused by name; at load that is one warning, and the
    model runs with prefetch off."""
    import rotary_gguf.runtime.scheduler as runtime_scheduler
    from rotary_gguf.router import RouterError

    index = open_index(tiny_model)
    name = f"blk.{index.moe_layers[-1]}.ffn_gate_inp.weight"
    tensors = tuple(t if t.name != name else type(t)(t.name, t.cls, t.layer, t.type, (t.shape[0], t.shape[1] + 1),
                                                    t.offset, t.nbytes, t.file) for t in index.tensors)
    with pytest.raises(RouterError, match=name):
        read_routers(type(index)(index.path, index.file_size, index.params, tensors, index.experts, index.metadata,
                                 index.files), index.moe_layers)

    def refuse(*_):
        raise RouterError(f"{name}: cannot read it")

    monkeypatch.setattr(runtime_scheduler, "read_routers", refuse)
    model = open_engine(tiny_model, "rtx4060-laptop-8gb", "rotary", ctx=256, threads=2, policy="lru",
                        vram_budget=slot_budget(tiny_model, 2))
    assert "no cross-layer prefetch" in caplog.text and not model.rotation.rotator.prefetching
    assert len(model.complete(list(range(10, 30)), 8, ignore_eos=True).tokens) == 8

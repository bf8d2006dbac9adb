"""The native decision engine (native/decide.cpp) makes the very decisions the Python Rotator made before
it moved into the plugin: same slot tables, pending copies, counters and bytes per token after every step,
for every policy, on the synthetic trace and on random traces, with 0 to n_expert slots, with and without a
copy budget. `_Reference` is the Python implementation as of commit 1bd4b7e (rotation.py), with the
admission margin added since, kept here only as the yardstick."""

from __future__ import annotations

import numpy as np
import pytest

from rotary_gguf.plugin import Decisions, PluginError
from rotary_gguf.rotation import (
    ADMIT_MARGIN,
    HYBRID_PRIOR_WEIGHT,
    LFU_DECAY,
    POLICIES,
    LayerShape,
    Rotator,
    make_policy,
)
from rotary_gguf.trace import synthetic_trace


def _unit_mean(values):
    values = np.asarray(values, dtype=float)
    return values / values.mean() if values.mean() > 0 else np.zeros_like(values)


class _Reference:
    """rotation.Rotator and its policies before the move to native code, condensed (same arithmetic)."""

    def __init__(self, layers, policy, budget, prior=None):
        self.layers, self.kind, self.budget, self.step = layers, policy, budget, 0
        order = sorted(layers)
        self.row = {layer: i for i, layer in enumerate(order)}
        width = max(s.n_expert for s in layers.values())
        depth = max(s.n_slots for s in layers.values())
        self.slot_of = np.full((len(order), width), -1)
        self.expert_in = np.full((len(order), depth), -1)
        self.busy = np.zeros((len(order), depth), dtype=bool)
        for layer, s in layers.items():
            self.busy[self.row[layer], s.n_slots:] = True
        self.slot_bytes = [layers[layer].slot_bytes for layer in order]
        self.pending, self.copied, self.counters = [], [], np.zeros((len(order), 5), np.int64)
        self.last = np.full((len(order), width), -1.0)
        self.score = np.zeros((len(order), width))
        self.decayed = np.zeros(len(order), dtype=np.int64)
        self.scale = np.array([HYBRID_PRIOR_WEIGHT * s.n_used / s.n_expert / (1 - LFU_DECAY)
                               for _, s in sorted(layers.items())])[:, None]
        self.calibration, self.request = np.zeros((len(order), width)), np.zeros((len(order), width))
        for layer, s in layers.items():
            if prior and layer in prior:
                self.calibration[self.row[layer], : s.n_expert] = _unit_mean(prior[layer])

    def observe(self, rows, ids, step):
        if self.kind == "lru":
            self.last[rows, ids] = step
            return
        seen = np.unique(rows)
        self.score[seen] *= (LFU_DECAY ** (step - self.decayed[seen]))[:, None]
        np.add.at(self.score, (rows, ids), 1.0)
        self.decayed[seen] = step

    def priority(self):
        if self.kind == "lru":
            return self.last
        lfu = self.score * (LFU_DECAY ** (self.step - self.decayed))[:, None]
        return lfu + self.scale * (self.request + self.calibration) if self.kind == "hybrid" else lfu

    def commit(self):
        for layer, expert, slot in self.pending:
            r = self.row[layer]
            self.slot_of[r, expert], self.expert_in[r, slot], self.busy[r, slot] = slot, expert, False
        self.pending = []

    def after_prompt(self, routing):
        self.commit()
        for layer, shape in self.layers.items():
            ids, r = routing.get(layer, np.empty(0, np.int32)), self.row[layer]
            if shape.n_slots == 0 or len(ids) == 0:
                continue
            self.observe(np.full(len(ids), r), ids, self.step)
            self.request[r, : shape.n_expert] = _unit_mean(np.bincount(ids, minlength=shape.n_expert))
            counts = np.bincount(ids, minlength=shape.n_expert)
            resident = self.slot_of[r, : shape.n_expert] >= 0
            chosen = np.lexsort((np.arange(shape.n_expert), ~resident, -counts))[: shape.n_slots].tolist()
            current = self.expert_in[r, : len(chosen)].tolist()
            stay = set(chosen) & set(current)
            newcomers = iter(e for e in chosen if e not in stay)
            chosen = [e if e in stay else next(newcomers) for e in current]
            self.slot_of[r] = -1
            self.slot_of[r, chosen] = np.arange(len(chosen))
            self.expert_in[r] = -1
            self.expert_in[r, : len(chosen)] = chosen

    def after_token(self, routing):
        self.step += 1
        layers = sorted(routing)
        rows = np.repeat(np.array([self.row[layer] for layer in layers], dtype=np.int64),
                         [len(routing[layer]) for layer in layers])
        ids = np.concatenate([routing[layer] for layer in layers]).astype(np.int64) if layers else rows
        for layer in layers:
            r = self.row[layer]
            hit = int(np.count_nonzero(self.slot_of[r, routing[layer]] >= 0))
            self.counters[r, :2] += (hit, len(routing[layer]) - hit)
        self.commit()
        self.observe(rows, ids, self.step)
        self.admit(layers, rows, ids)

    def admit(self, layers, rows, ids):
        budget, priority = self.budget, self.priority()
        margin = 0.0 if self.kind == "lru" else ADMIT_MARGIN
        with_slots = np.array([self.layers[layer].n_slots > 0 for layer in layers], dtype=bool)
        rank = np.zeros(len(self.row), dtype=np.int64)
        rank[[self.row[layer] for layer in layers]] = np.arange(len(layers))
        keep = (self.slot_of[rows, ids] < 0) & with_slots[rank[rows]] if len(ids) else np.zeros(0, bool)
        pairs = np.unique(rows[keep] * priority.shape[1] + ids[keep])
        c_rows, c_ids = pairs // priority.shape[1], pairs % priority.shape[1]
        fairness = (rank[c_rows] - self.step) % max(1, len(self.layers))
        order = np.lexsort((c_ids, c_rows, fairness, -priority[c_rows, c_ids]))
        values = np.where(self.expert_in >= 0,
                          np.take_along_axis(priority, np.maximum(self.expert_in, 0), axis=1), -np.inf)
        values[self.busy] = np.inf
        victims = np.argsort(values, axis=1, kind="stable")
        copied, taken, closed, layer_of = 0, [0] * len(self.row), set(), sorted(self.layers)
        for row, expert in zip(c_rows[order].tolist(), c_ids[order].tolist(), strict=True):
            size = self.slot_bytes[row]
            if row in closed or (budget is not None and copied + size > budget):
                continue
            k = taken[row]
            if k >= victims.shape[1] or not priority[row, expert] > values[row, victims[row, k]] + margin:
                closed.add(row)
                continue
            slot, taken[row] = int(victims[row, k]), k + 1
            victim = int(self.expert_in[row, slot])
            if victim >= 0:
                self.slot_of[row, victim] = -1
                self.counters[row, 3] += 1
            self.expert_in[row, slot], self.busy[row, slot] = -1, True
            self.pending.append((layer_of[row], expert, slot))
            copied += size
            self.counters[row, 2] += 1
            self.counters[row, 4] += size
        self.copied.append(copied)


def _assert_same(native: Rotator, ref: _Reference, where: str) -> None:
    assert np.array_equal(native.native.slot_of, ref.slot_of), where
    assert np.array_equal(native.native.expert_in, ref.expert_in), where
    assert np.array_equal(native.native.busy, ref.busy), where
    assert np.array_equal(native.native.counters[:, :5].astype(np.int64), ref.counters), where  # no prefetch
    assert native.pending == ref.pending, where
    assert native.copied_per_token.tolist() == ref.copied, where
    assert native.step == ref.step, where


def _replay_both(steps, layers, policy, budget, prior=None) -> Rotator:
    native = Rotator(layers, make_policy(policy, layers, prior), lambda: budget)
    ref = _Reference(layers, policy, budget, prior)
    for i, (phase, routing) in enumerate(steps):
        for r in (native, ref):
            (r.after_prompt if phase == "prompt" else r.after_token)(routing)
        _assert_same(native, ref, f"{policy}, budget {budget}, step {i} ({phase})")
        values = native.native.values()
        assert np.array_equal(values, ref.priority()), f"{policy}: values at step {i}"
    return native


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("slots", [0, 1, 5, 32])
@pytest.mark.parametrize("budget", [None, 0, 2500, 9000])
def test_native_decisions_equal_the_python_reference_on_the_synthetic_trace(policy, slots, budget):
    trace = synthetic_trace(layers=5, n_expert=32, n_used=4, requests=3, prompt_tokens=12, decode_tokens=50,
                            slot_bytes=1000, seed=3)
    layers = {layer: LayerShape(32, 4, slots, 1000) for layer in range(5)}
    native = _replay_both(trace.steps, layers, policy, budget)
    if 0 < slots < 32 and budget != 0:
        assert native.totals().admissions > 0
    if budget is not None:
        assert max(native.copied_per_token) <= budget


def _random_steps(rng, layers, tokens):
    """Prompts and decoded tokens over uneven layers; some steps leave a layer out or route it no token."""
    steps = []
    for t in range(tokens):
        phase = "prompt" if t % 25 == 0 else "decode"
        n_tokens = int(rng.integers(1, 20)) if phase == "prompt" else 1
        routing = {}
        for layer, s in layers.items():
            if rng.random() < 0.05:
                continue  # absent
            n = 0 if rng.random() < 0.05 else n_tokens
            skew = rng.zipf(1.5, size=(n, s.n_expert)).astype(float)
            routing[layer] = np.argsort(-skew, axis=1, kind="stable")[:, : s.n_used].reshape(-1).astype(np.int32)
        steps.append((phase, routing))
    return steps


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(4))
def test_native_decisions_equal_the_python_reference_on_random_traces(policy, seed):
    rng = np.random.default_rng(seed)
    layers = {3: LayerShape(16, 2, 4, 700), 7: LayerShape(24, 3, 0, 900), 8: LayerShape(24, 3, 24, 900),
              12: LayerShape(40, 4, 9, 1300), 20: LayerShape(16, 2, 1, 700)}
    prior = {layer: rng.random(s.n_expert) * rng.integers(1, 100) for layer, s in layers.items() if layer != 8}
    steps = _random_steps(rng, layers, 120)
    for budget in (None, 1400, 4000):
        _replay_both(steps, layers, policy, budget, prior)


def test_the_simulator_needs_no_llama_cpp_and_bad_input_is_refused():
    layers = {0: LayerShape(8, 2, 3, 10)}
    rotator = Rotator(layers, make_policy("lfu", layers))
    with pytest.raises(Exception, match="expert 8 routed, the layer has 8"):
        rotator.after_token({0: np.array([1, 8], np.int32)})
    with pytest.raises(Exception, match="not have"):
        rotator.after_token({5: np.array([1], np.int32)})
    with pytest.raises(PluginError, match="0 <= slots <= experts"):
        Decisions([(0, 8, 2, 9, 10)], "frequency", 0.9, 0, 0)
    with pytest.raises(PluginError, match="decay"):
        Decisions([(0, 8, 2, 3, 10)], "frequency", 1.0, 0, 0)
    rotator.set_resident(0, [5, 6])
    assert rotator.expert_in[0].tolist() == [5, 6, -1] and rotator.slot_of[0][6] == 1

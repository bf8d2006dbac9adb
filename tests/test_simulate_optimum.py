"""The yardstick of `rotary simulate`: the offline optimum on hand-made traces whose optimum is known, against
exhaustive search on small random traces, as a bound of the policies, and in the JSON and text output."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from rotary_gguf.cli import main
from rotary_gguf.profile import load_profile
from rotary_gguf.rotation import POLICIES
from rotary_gguf.simulate import offline_optimum, simulate, simulate_policies
from rotary_gguf.trace import Trace, TraceHeader, synthetic_trace, write_trace

PROFILE = load_profile("rtx4060-laptop-8gb")
UNLIMITED = 10**15  # a copy budget that never binds


def one_layer(tokens: list[list[int]], n_expert: int, prompt: list[int] | None = None) -> Trace:
    """A one-layer trace: an optional prompt batch, then one decoded token per list of expert ids."""
    steps = [("prompt", {0: np.array(prompt, np.int32)})] if prompt is not None else []
    steps += [("decode", {0: np.array(ids, np.int32)}) for ids in tokens]
    return Trace(TraceHeader("hand-made", (0,), n_expert, len(tokens[0]), {0: 1000}), steps)


def rates(trace: Trace, slots: int) -> tuple[float, float]:
    optimum = offline_optimum(trace, slots)
    return optimum.hit_rate, optimum.delayed_hit_rate


def exhaustive(tokens: list[list[int]], slots: int, delayed: bool, start: frozenset[int] = frozenset()) -> int:
    """Most hits over every admission and eviction choice: after each token the slots keep any of their
    residents plus any of the token's misses; delayed, a miss admitted after token i serves from i+2 and its
    victim is gone from i+1 (the runtime's constraint)."""
    def subsets(items: frozenset[int]):
        return (frozenset(c) for r in range(len(items) + 1) for c in itertools.combinations(sorted(items), r))

    states = {(start, frozenset()): 0}  # (serving, in flight) -> hits so far
    for ids in tokens:
        wanted, after = frozenset(ids), {}
        for (serving, pending), hits in states.items():
            hits += len(wanted & serving)
            resident = serving | pending
            for keep, admit in itertools.product(subsets(resident), subsets(wanted - resident)):
                if len(keep) + len(admit) <= slots:
                    state = (keep, admit) if delayed else (keep | admit, frozenset())
                    after[state] = max(after.get(state, -1), hits)
        states = after
    return max(states.values())


def test_known_optima_by_hand():
    every_token = one_layer([[0]] * 10, 2)
    assert rates(every_token, 1) == pytest.approx((9 / 10, 8 / 10))  # the delay costs token 1
    # A one-off newcomer is bypassed: the resident is needed again.
    bypass = one_layer([[0], [0], [1], [0], [0]], 2)
    assert rates(bypass, 1) == pytest.approx((3 / 5, 2 / 5))
    # Seeded from the prompt (expert 1 its most selected): the oracle starts from the same slots.
    seeded = one_layer([[1], [1], [0], [1]], 2, prompt=[1, 1, 0])
    assert rates(seeded, 1) == pytest.approx((3 / 4, 3 / 4))
    # Top-2 tokens are one batch: with 2 slots, {0, 1} then {2, 3} then {0, 1} keeps 0 and 1 at best.
    batch = one_layer([[0, 1], [2, 3], [0, 1], [2, 3], [0, 1]], 4)
    assert offline_optimum(batch, 2).hit_rate == pytest.approx(4 / 10)
    assert rates(batch, 4) == pytest.approx((6 / 10, 6 / 10))  # all fit; none returns at i+1, so no delay cost
    assert rates(batch, 0) == (0.0, 0.0)


def test_belady_rule_is_not_optimal_under_the_delay():
    """Documented gap: keeping resident 0 for its one use at token 1 (its next use is sooner) loses expert 1's
    two later hits, which admitting 1 at token 0 would have won."""
    tokens = [[1], [0], [2], [1], [1]]
    trace = one_layer(tokens, 3, prompt=[0])
    assert offline_optimum(trace, 1).delayed_hit_rate == pytest.approx(1 / 5)
    assert exhaustive(tokens, 1, delayed=True, start=frozenset({0})) == 2


@pytest.mark.parametrize("seed", range(3))
def test_oracle_against_exhaustive_search(seed):
    rng = random.Random(seed)
    gaps = []
    for _ in range(40):
        tokens = [rng.sample(range(5), 2) for _ in range(11)]
        optimum = offline_optimum(one_layer(tokens, 5), 2)
        reads = 2 * len(tokens)
        assert round(optimum.hit_rate * reads) == exhaustive(tokens, 2, delayed=False)  # Belady MIN is exact
        best = exhaustive(tokens, 2, delayed=True)
        gaps.append(best - round(optimum.delayed_hit_rate * reads))
    assert min(gaps) >= 0 and max(gaps) <= 3  # the Belady rule is achievable, a few reads short at worst
    assert np.mean(gaps) <= 1.0


def test_no_policy_beats_the_exhaustive_delayed_optimum():
    """The oracle's constraint is the runtime's: a policy through the very Rotator, with a copy budget that
    never binds, never serves more than exhaustive search under the delay."""
    rng = random.Random(7)
    for _ in range(10):
        tokens = [rng.sample(range(5), 2) for _ in range(10)]
        best = exhaustive(tokens, 2, delayed=True) / (2 * len(tokens))
        for policy in POLICIES:
            assert simulate(one_layer(tokens, 5), 2, policy, PROFILE, budget_bytes=UNLIMITED).hit_rate <= best + 1e-9


def test_layers_and_requests_add_up():
    """Two layers and two requests: the oracle over the whole trace is the layers' and requests' sum."""
    a, b = [[0, 1], [2, 3], [0, 1], [0, 2]], [[3, 4], [3, 4], [0, 4], [1, 2]]
    steps = [("prompt", {0: np.array([0, 1]), 1: np.array([3, 4])})]
    steps += [("decode", {0: np.array(x), 1: np.array(y)}) for x, y in zip(a, b, strict=True)]
    steps += [("prompt", {0: np.array([2, 3]), 1: np.array([0, 1])})]
    steps += [("decode", {0: np.array(y), 1: np.array(x)}) for x, y in zip(a, b, strict=True)]
    trace = Trace(TraceHeader("two", (0, 1), 5, 2, {0: 1, 1: 1}), steps)
    for delayed in (False, True):
        parts = [exhaustive(a, 2, delayed, frozenset({0, 1})), exhaustive(b, 2, delayed, frozenset({3, 4})),
                 exhaustive(b, 2, delayed, frozenset({2, 3})), exhaustive(a, 2, delayed, frozenset({0, 1}))]
        got = rates(trace, 2)[delayed] * 32
        assert round(got) == sum(parts) if not delayed else 0.8 * sum(parts) <= round(got) <= sum(parts)


def test_share_of_optimal_in_json_and_text(tmp_path):
    trace = synthetic_trace(layers=4, n_expert=32, n_used=4, requests=2, prompt_tokens=8, decode_tokens=60)
    path = write_trace(tmp_path / "s.rtrc", trace)
    results = simulate_policies(trace, 8, list(POLICIES), PROFILE)
    optimum = offline_optimum(trace, 8)
    for r in results:
        assert (r.optimal_hit_rate, r.optimal_delayed_hit_rate) == (optimum.hit_rate, optimum.delayed_hit_rate)
        assert r.share_of_optimal == pytest.approx(r.hit_rate / optimum.delayed_hit_rate)
        assert r.hit_rate < optimum.delayed_hit_rate <= optimum.hit_rate < 1
    runner = CliRunner()
    out = runner.invoke(main, ["simulate", str(path), "--slots", "8", "--policy", "lfu", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["optimal_hit_rate"] == round(optimum.hit_rate, 4)
    assert data["optimal_delayed_hit_rate"] == round(optimum.delayed_hit_rate, 4)
    assert data["share_of_optimal"] == round(results[POLICIES.index("lfu")].share_of_optimal, 4) > 0
    text = runner.invoke(main, ["simulate", str(path), "--slots", "8"])
    assert text.exit_code == 0, text.output
    assert (f"offline optimum: {optimum.hit_rate:.1%} (immediate admission), {optimum.delayed_hit_rate:.1%} "
            "(with the runtime's admission delay)") in text.stdout
    for r in results:
        assert f"{r.label:<17}{r.hit_rate:>10.1%}{r.share_of_optimal:>12.2f}" in text.stdout

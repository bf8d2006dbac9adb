"""Expert rotation: which experts the VRAM slots hold, token by token.

One state machine serves the running scheduler plugin and the policy simulator alike, so that the
simulator's hit rate on a recorded trace is the plugin's, exactly: the plugin library's native decision
engine (native/decide.cpp, `rotary_decide_*`), which `Rotator` wraps; this module defines the policies'
parameters (the engine has no defaults of its own):

- after a request's prompt, each layer's slots take the experts the prompt selected most (prompt-seeded
  warm-up: a synchronous copy before the first decoded token);
- after every decoded token: the copies started one token earlier are committed (the plugin waits for
  them: a copy stall if they have not landed), the policy learns the token's routing, and the token's
  misses are admitted in priority order while the per-token copy budget lasts, each evicting the
  resident the policy values least. A slot being copied is out of the table until its commit, so an
  admitted expert serves reads from the second token after its miss;
- with cross-layer prefetch, during a decoded token each MoE layer's experts are predicted one layer
  ahead (the next router on this layer's input) and the predicted experts not resident are copied into
  slots at once, ahead of the rotation's copies, within what the copy budget leaves: a right prediction
  serves the same token. A layer whose prediction recall falls below PREFETCH_MIN_RECALL stops
  prefetching until it recovers (its predictions are still scored).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from rotary_gguf.errors import RotaryError
from rotary_gguf.plugin import DECISION_COUNTERS, Decisions, ModelScheduler, PluginError

POLICIES = ("lru", "lfu", "hybrid")
# Chosen with `rotary simulate` against the offline optimum on the shipped model's recorded traces and the
# synthetic trace (docs/rotation.md, "Choosing the default"): decay 0.8-0.98, prior weight 0-2 and
# admission margin 0-1.5 tried.
DEFAULT_POLICY = "hybrid"
LFU_DECAY = 0.9  # per decoded token
HYBRID_PRIOR_WEIGHT = 0.25  # of the steady-state mean LFU score
ADMIT_MARGIN = 1.0  # decayed selections a newcomer must be worth beyond the resident it replaces
# Chosen with `rotary simulate --prefetch` on the shipped model's recorded traces (docs/rotation.md,
# "Cross-layer prefetch").
PREFETCH_MIN_RECALL = 0.6  # a layer prefetches while its decayed prediction recall is at least this
PREFETCH_RECALL_DECAY = 0.9  # per predicted token


class RotationError(RotaryError):
    """An unknown policy, or a trace that does not fit the model."""


@dataclass(frozen=True)
class LayerShape:
    n_expert: int
    n_used: int
    n_slots: int
    slot_bytes: int  # bytes copied to admit one expert (all its stacked weights)


@dataclass(frozen=True)
class Policy:
    """How valuable each expert of a layer is, as the native decision engine computes it (rotary_sched.h):
    base + n_used / n_expert / (1 - decay) * (request_weight * request + calibration_weight * calibration),
    where base is the step the expert was last selected in ("recency") or its selections decayed by `decay`
    per token ("frequency"), request the last prompt's routing and calibration the calibration set's
    popularity (`prior`), each normalised to mean 1 over the layer's experts. Higher: keep it. A missed
    expert takes a slot only when its value exceeds the resident's by more than admit_margin."""

    name: str
    kind: str  # "recency" or "frequency"
    decay: float = 0.0
    request_weight: float = 0.0
    calibration_weight: float = 0.0
    admit_margin: float = 0.0
    prior: dict[int, np.ndarray] | None = field(default=None, compare=False)


_POLICIES = {
    # Least recently used: an expert is worth the step it was last selected in.
    "lru": Policy("lru", "recency"),
    # Decayed LFU: every selection adds 1, every token multiplies the scores by LFU_DECAY (a topic change
    # is forgotten in ~1/(1-decay) tokens).
    # A missed expert replaces a resident only when its score beats the resident's by ADMIT_MARGIN (one
    # selection): an expert seen once does not push out one in steady use.
    "lfu": Policy("lfu", "frequency", LFU_DECAY, admit_margin=ADMIT_MARGIN),
    # Decayed LFU plus two priors that do not decay: the request's prompt routing and the calibration
    # popularity, weighted by HYBRID_PRIOR_WEIGHT of the steady-state mean score.
    "hybrid": Policy("hybrid", "frequency", LFU_DECAY, HYBRID_PRIOR_WEIGHT, HYBRID_PRIOR_WEIGHT, ADMIT_MARGIN),
}
assert tuple(_POLICIES) == POLICIES


def make_policy(name: str, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> Policy:
    """The named policy, with the calibration popularity of these layers (n_expert values per layer)."""
    if name not in _POLICIES:
        raise RotationError(f"unknown rotation policy {name!r}; known: {', '.join(POLICIES)}")
    for layer, values in (prior or {}).items():
        if layer in layers and len(values) != layers[layer].n_expert:
            raise RotationError(f"layer {layer}: a calibration prior of {len(values)} experts, the layer has "
                                f"{layers[layer].n_expert}")
    return replace(_POLICIES[name], prior=prior)


def can_rotate(layers: dict[int, LayerShape]) -> bool:
    """Whether any layer's slots can change: some but not all of its experts fit (no slots: the plugin only
    counts; every expert resident: nothing to move)."""
    return any(0 < s.n_slots < s.n_expert for s in layers.values())


class LayerCounters:
    """One layer's decision counters (DECISION_COUNTERS); a layer's own is a writable view of the native
    table, a total a copy."""

    __slots__ = ("values",)

    def __init__(self, values: np.ndarray | None = None) -> None:
        self.values = np.zeros(len(DECISION_COUNTERS), np.uint64) if values is None else values


def _counter(i: int) -> property:
    return property(lambda self: int(self.values[i]), lambda self, value: self.values.__setitem__(i, value))


for _i, _name in enumerate(DECISION_COUNTERS):  # hits, misses, admissions, evictions, bytes_copied
    setattr(LayerCounters, _name, _counter(_i))


class Rotator:
    """The slot tables of every MoE layer and the policy that rotates them (see the module docstring), in
    the plugin's native decision engine, bound to a model's scheduler state (its copier then receives the
    admissions directly) or to none (the simulator).

    `budget()` gives the bytes that may be copied after a decoded token (None: no limit). `slot_of[layer]`,
    `expert_in[layer]`, `busy[layer]` and `counters[layer]` are views of the native tables."""

    def __init__(self, layers: dict[int, LayerShape], policy: Policy,
                 budget: Callable[[], int | None] = lambda: None, model: ModelScheduler | None = None,
                 prefetch: bool = False) -> None:
        self.layers, self.policy, self.budget, self.prefetching = layers, policy, budget, prefetch
        self._order = sorted(layers)
        self.row = {layer: i for i, layer in enumerate(self._order)}
        shapes = [(layer, s.n_expert, s.n_used, s.n_slots, s.slot_bytes) for layer, s in sorted(layers.items())]
        try:
            self.native = Decisions(shapes, policy.kind, policy.decay, policy.request_weight,
                                    policy.calibration_weight, policy.admit_margin, model)
            for layer, popularity in (policy.prior or {}).items():
                if layer in layers:
                    self.native.set_prior(layer, popularity)
            if prefetch:
                self.native.set_prefetch(PREFETCH_MIN_RECALL, PREFETCH_RECALL_DECAY)
        except PluginError as exc:
            raise RotationError(f"rotation decisions: {exc}") from None
        n = self.native
        self.slot_of = {layer: n.slot_of[i, : layers[layer].n_expert] for layer, i in self.row.items()}
        self.expert_in = {layer: n.expert_in[i, : layers[layer].n_slots] for layer, i in self.row.items()}
        self.busy = {layer: n.busy[i, : layers[layer].n_slots] for layer, i in self.row.items()}
        self.counters = {layer: LayerCounters(n.counters[i]) for layer, i in self.row.items()}

    @property
    def step(self) -> int:
        return self.native.step

    @step.setter
    def step(self, value: int) -> None:
        self.native.step = value

    @property
    def copied_per_token(self) -> np.ndarray:
        return self.native.copied()

    @property
    def pending(self) -> list[tuple[int, int, int]]:
        """(layer, expert, slot) being copied."""
        return [(layer, expert, slot) for layer, expert, slot, _ in self.native.pending()]

    def routing_arrays(self, routing: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The engine's routing arguments: ids of the layers present concatenated, counts per row (-1: absent)."""
        if not routing.keys() <= self.row.keys():
            raise RotationError(f"routing for layers {sorted(routing.keys() - self.row.keys())} that the "
                                f"rotator does not have ({len(self.row)} layers)")
        counts = np.array([len(routing[layer]) if layer in routing else -1 for layer in self._order], np.int64)
        present = [routing[layer] for layer in self._order if layer in routing]
        ids = np.concatenate(present).astype(np.int32, copy=False) if present else np.zeros(1, np.int32)
        return np.ascontiguousarray(ids), counts

    def _call(self, fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except PluginError as exc:
            raise RotationError(f"rotation decisions: {exc}") from None

    def after_prompt(self, routing: dict[int, np.ndarray]) -> None:
        """Seed every layer's slots with the prompt's most selected experts (residents win ties)."""
        self._call(self.native.after_prompt, *self.routing_arrays(routing))
        if self.prefetching:
            self.native.set_budget(self.budget())

    def set_resident(self, layer: int, chosen: list[int]) -> None:
        """Fill a layer's slots with these experts (a synchronous copy): those already resident stay in their
        slots, the others take the remaining slots in the order given, so only newcomers are copied."""
        self._call(self.native.set_resident, layer, [int(e) for e in chosen])

    def seed(self, popularity: dict[int, np.ndarray]) -> None:
        """Each layer's slots take its most popular experts (the calibration's, at load)."""
        for layer, shape in self.layers.items():
            if shape.n_slots and layer in popularity:
                chosen = [int(e) for e in np.argsort(-np.asarray(popularity[layer]), kind="stable")[: shape.n_slots]]
                self.set_resident(layer, chosen)

    def before_prompt(self) -> None:
        """A prompt follows: predictions made during it are ignored (decoding resumes at after_prompt)."""
        self.native.before_prompt()

    def prefetch(self, layer: int, predicted: np.ndarray) -> int:
        """During a decoded token: a prediction of the layer's experts (best first); copies the predicted
        experts that are not resident while the budget lasts. Returns how many copies it started."""
        return int(self._call(self.native.prefetch, layer, predicted))

    def recall(self, layer: int) -> float:
        """The layer's decayed prediction recall, which switches its prefetch (1 before any prediction)."""
        return self.native.recall(layer)

    def after_token(self, routing: dict[int, np.ndarray]) -> None:
        """Count the token's hits, commit the previous token's copies, admit this token's misses."""
        self._call(self.native.after_token, *self.routing_arrays(routing), self.budget())

    def after_recorded_token(self) -> None:
        """after_token on the routing the bound model recorded (taken natively: no routing crosses to Python)."""
        self._call(self.native.after_recorded_token, self.budget())

    def reset_counters(self) -> None:
        self.native.reset_counters()

    def totals(self) -> LayerCounters:
        return LayerCounters(self.native.counters.sum(axis=0, dtype=np.uint64))

    @property
    def hit_rate(self) -> float:
        t = self.totals()
        return t.hits / (t.hits + t.misses) if t.hits + t.misses else 0.0


COPY_BUDGET_SHARE = 0.5  # of what the PCIe link moves in one measured token time


def replay_ids(trace, layers: dict[int, LayerShape]) -> dict[int, np.ndarray]:
    """Each model layer's ids from a trace (every step, in order): trace layers are assigned to model
    layers in order, cycling when the trace has fewer; the trace's experts per token must equal the
    model's and its expert ids must exist in the model."""
    h = trace.header
    shapes = list(layers.items())
    if shapes and h.n_expert_used != shapes[0][1].n_used:
        raise RotationError(f"the trace routes {h.n_expert_used} experts per token, the model {shapes[0][1].n_used}")
    if shapes and h.n_expert > min(s.n_expert for _, s in shapes):
        raise RotationError(f"the trace has {h.n_expert} experts per layer, the model {shapes[0][1].n_expert}")
    if not h.layers or not trace.steps:
        raise RotationError("the trace has no steps to replay")
    out = {}
    for i, (layer, _) in enumerate(shapes):
        source = h.layers[i % len(h.layers)]
        out[layer] = np.concatenate([routing[source] for _, routing in trace.steps]).astype(np.int32)
    return out


class Rotation:
    """A loaded model's rotation: the plugin records each step's routing, the Rotator decides, the plugin
    copies. The copy budget per token is COPY_BUDGET_SHARE of the PCIe bytes of the measured token time
    (exponential average), unless a fixed budget is given. Routing can be written to a trace as it goes."""

    def __init__(self, plugin, layers: dict[int, LayerShape], policy: str = DEFAULT_POLICY, *,
                 pcie_gbs: float = 0.0, budget_bytes: int | None = None, prior: dict[int, np.ndarray] | None = None,
                 rotate: bool = True, prefetch: bool = False, trace=None, replay=None,
                 observer: Callable[[str, dict[int, np.ndarray]], None] | None = None) -> None:
        self.plugin, self.layers, self.trace, self.rotate, self.replay = plugin, layers, trace, rotate, replay
        self.observer = observer  # sees every step's routing ("prompt" or "decode")
        # The plugin keeps every step's routing for us only when something reads it.
        # (Prompt seeding needs it too, unless no layer has slots or every expert is resident.)
        self.recording = bool(rotate or trace or observer or can_rotate(layers))
        self.fixed_budget, self.pcie_gbs = budget_bytes, pcie_gbs
        self.copy_gbs: float | None = None  # the copier's measured rate, once it has copied
        self.token_seconds: float | None = None
        self._last = 0.0
        self.rotator = Rotator(layers, make_policy(policy, layers, prior), self.budget, plugin,
                               prefetch=prefetch and rotate)
        plugin.set_recording(self.recording, predictions=bool(trace))
        if replay is not None:
            for layer, ids in replay_ids(replay, layers).items():
                plugin.set_replay(layer, ids)

    @property
    def slots(self) -> dict[int, int]:
        return {layer: s.n_slots for layer, s in self.layers.items() if s.n_slots}

    def budget(self) -> int | None:
        """Bytes that may be copied after this token: COPY_BUDGET_SHARE of what the slower of the PCIe link
        (profile) and the copier's measured rate (file mapping -> staging) moves in one token time."""
        if self.fixed_budget is not None:
            return self.fixed_budget
        if not self.pcie_gbs or self.token_seconds is None:
            return None
        rate = min(self.pcie_gbs, self.copy_gbs) if self.copy_gbs else self.pcie_gbs
        return int(COPY_BUDGET_SHARE * rate * 1e9 * self.token_seconds)

    def _measure_copier(self) -> None:
        stats = self.plugin.stats()
        if stats.copy_ns:  # since the last reset (each request); kept from earlier requests until it copies
            self.copy_gbs = stats.copy_gbs

    def seed_from_popularity(self, popularity: dict[int, np.ndarray]) -> None:
        """Before any request: each layer's slots take its most popular experts over the calibration set."""
        self.rotator.seed(popularity)

    def watch(self, observer: Callable[[str, dict[int, np.ndarray]], None]) -> None:
        """From now on, observer(phase, routing) sees every step's routing ("prompt" or "decode")."""
        self.observer = observer
        self.recording = True
        self.plugin.set_recording(True, predictions=bool(self.trace))

    def _record(self, phase: str, routing: dict[int, np.ndarray]) -> None:
        if self.trace:
            predicted = {layer: self.plugin.take_predictions(layer) for layer in self.layers}
            self.trace.write_step(phase, routing, predicted)
        if self.observer:
            self.observer(phase, routing)

    def _take(self) -> dict[int, np.ndarray]:
        return {layer: self.plugin.take_routing(layer) for layer in self.layers} if self.recording else {}

    def before_prompt(self) -> None:
        self.plugin.commit()
        self._take()  # routing of anything evaluated outside a request
        for layer in self.layers if self.trace else ():
            self.plugin.take_predictions(layer)
        self.rotator.before_prompt()
        self.plugin.reset_stats()

    def after_prompt(self) -> None:
        routing = self._take()
        self._record("prompt", routing)
        self.rotator.after_prompt(routing)
        self.plugin.reset_stats()
        self.rotator.reset_counters()
        self._last = time.perf_counter()

    def after_token(self) -> None:
        now = time.perf_counter()
        elapsed = now - self._last
        self.token_seconds = elapsed if self.token_seconds is None else 0.8 * self.token_seconds + 0.2 * elapsed
        if self.rotate and not (self.trace or self.observer):
            self._measure_copier()
            self.rotator.after_recorded_token()  # one native call: take the routing, decide, start the copies
        else:
            routing = self._take()
            self._record("decode", routing)
            if self.rotate:
                self._measure_copier()
                self.rotator.after_token(routing)
        self._last = time.perf_counter()

    def layer_stats(self):
        return [self.plugin.layer_stats(layer) for layer in self.plugin.layers]

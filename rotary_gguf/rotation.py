"""Expert rotation: which experts the VRAM slots hold, token by token.

One state machine serves the running scheduler plugin and the policy simulator alike, so that the
simulator's hit rate on a recorded trace is the plugin's, exactly (for deterministic policies):

- after a request's prompt, each layer's slots take the experts the prompt selected most (prompt-seeded
  warm-up: a synchronous copy before the first decoded token);
- after every decoded token: the copies started one token earlier are committed (the plugin waits for
  them: a copy stall if they have not landed), the policy learns the token's routing, and the token's
  misses are admitted in priority order while the per-token copy budget lasts, each evicting the
  resident the policy values least. A slot being copied is out of the table until its commit, so an
  admitted expert serves reads from the second token after its miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rotary_gguf.errors import RotaryError

POLICIES = ("lru", "lfu", "hybrid")
DEFAULT_POLICY = "hybrid"  # chosen with `rotary simulate` (README "Expert rotation")
LFU_DECAY = 0.95  # per decoded token; 0.8-0.98 tried on the synthetic trace (README)
HYBRID_PRIOR_WEIGHT = 1.0  # of the steady-state mean LFU score; 0.25-2 tried


class RotationError(RotaryError):
    """An unknown policy, or a trace that does not fit the model."""


@dataclass(frozen=True)
class LayerShape:
    n_expert: int
    n_used: int
    n_slots: int
    slot_bytes: int  # bytes copied to admit one expert (all its stacked weights)


class Policy:
    """How valuable an expert of a layer is, after the routing seen so far (higher: keep it)."""

    name = ""

    def __init__(self, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> None:
        self.layers = layers

    def observe(self, layer: int, ids: np.ndarray, step: int) -> None:
        raise NotImplementedError

    def observe_prompt(self, layer: int, ids: np.ndarray, step: int) -> None:
        """A request's prompt batch: by default, as if its tokens had been decoded at this step."""
        self.observe(layer, ids, step)

    def priority(self, layer: int, step: int) -> np.ndarray:
        raise NotImplementedError


class LRU(Policy):
    """Least recently used: an expert is worth the step it was last selected in."""

    name = "lru"

    def __init__(self, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> None:
        super().__init__(layers)
        self.last = {layer: np.full(s.n_expert, -1.0) for layer, s in layers.items()}

    def observe(self, layer: int, ids: np.ndarray, step: int) -> None:
        self.last[layer][ids] = step

    def priority(self, layer: int, step: int) -> np.ndarray:
        return self.last[layer]


class DecayedLFU(Policy):
    """Least frequently used with exponential decay: every selection adds 1, every token multiplies the
    scores by LFU_DECAY (so a topic change is forgotten in ~1/(1-decay) tokens)."""

    name = "lfu"

    def __init__(self, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> None:
        super().__init__(layers)
        self.score = {layer: np.zeros(s.n_expert) for layer, s in layers.items()}
        self.step = {layer: 0 for layer in layers}

    def observe(self, layer: int, ids: np.ndarray, step: int) -> None:
        score = self.score[layer]
        score *= LFU_DECAY ** (step - self.step[layer])
        np.add.at(score, ids, 1.0)
        self.step[layer] = step

    def priority(self, layer: int, step: int) -> np.ndarray:
        return self.score[layer] * LFU_DECAY ** (step - self.step[layer])


class Hybrid(DecayedLFU):
    """Decayed LFU plus two priors that do not decay: the request's prompt routing and, when the model
    was calibrated, its popularity over the calibration set (each normalised to mean 1 over the layer's
    experts and weighted by HYBRID_PRIOR_WEIGHT of the steady-state mean score)."""

    name = "hybrid"

    def __init__(self, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> None:
        super().__init__(layers)
        self.scale = {layer: HYBRID_PRIOR_WEIGHT * s.n_used / s.n_expert / (1 - LFU_DECAY)
                      for layer, s in layers.items()}
        self.calibration = {layer: _unit_mean(prior[layer]) if prior and layer in prior else np.zeros(s.n_expert)
                            for layer, s in layers.items()}
        self.request = {layer: np.zeros(s.n_expert) for layer, s in layers.items()}

    def observe_prompt(self, layer: int, ids: np.ndarray, step: int) -> None:
        super().observe_prompt(layer, ids, step)
        self.request[layer] = _unit_mean(np.bincount(ids, minlength=self.layers[layer].n_expert))

    def priority(self, layer: int, step: int) -> np.ndarray:
        return super().priority(layer, step) + self.scale[layer] * (self.request[layer] + self.calibration[layer])


def _unit_mean(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values / values.mean() if values.mean() > 0 else np.zeros_like(values)


def make_policy(name: str, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> Policy:
    classes = {cls.name: cls for cls in (LRU, DecayedLFU, Hybrid)}
    if name not in classes:
        raise RotationError(f"unknown rotation policy {name!r}; known: {', '.join(POLICIES)}")
    return classes[name](layers, prior)


class SlotBackend:
    """Where the slot table's decisions go: the scheduler plugin, or nowhere (the simulator)."""

    def set_resident(self, layer: int, experts: list[int]) -> None:
        pass

    def admit(self, layer: int, experts: list[int], slots: list[int]) -> None:
        pass

    def commit(self) -> None:
        pass


@dataclass
class LayerCounters:
    hits: int = 0  # decoded (token, expert) selections served from a slot
    misses: int = 0
    admissions: int = 0
    evictions: int = 0
    bytes_copied: int = 0


@dataclass
class Rotator:
    """The slot tables of every MoE layer and the policy that rotates them (see the module docstring).

    `budget(step)` gives the bytes that may be copied after a decoded token (None: no limit)."""

    layers: dict[int, LayerShape]
    policy: Policy
    budget: Callable[[], int | None] = lambda: None
    backend: SlotBackend = field(default_factory=SlotBackend)
    step: int = 0

    def __post_init__(self) -> None:
        self.slot_of = {layer: np.full(s.n_expert, -1, dtype=np.int64) for layer, s in self.layers.items()}
        self.expert_in = {layer: np.full(s.n_slots, -1, dtype=np.int64) for layer, s in self.layers.items()}
        self.busy = {layer: np.zeros(s.n_slots, dtype=bool) for layer, s in self.layers.items()}  # being copied
        self.pending: list[tuple[int, int, int]] = []  # (layer, expert, slot) being copied
        self.counters = {layer: LayerCounters() for layer in self.layers}
        self.copied_per_token: list[int] = []

    def after_prompt(self, routing: dict[int, np.ndarray]) -> None:
        """Seed every layer's slots with the prompt's most selected experts (residents win ties)."""
        self._commit()
        for layer, shape in self.layers.items():
            ids = routing.get(layer, np.empty(0, np.int32))
            if shape.n_slots == 0 or len(ids) == 0:
                continue
            self.policy.observe_prompt(layer, ids, self.step)
            counts = np.bincount(ids, minlength=shape.n_expert)
            resident = self.slot_of[layer] >= 0
            order = np.lexsort((np.arange(shape.n_expert), ~resident, -counts))
            self.set_resident(layer, [int(e) for e in order[: shape.n_slots]])

    def set_resident(self, layer: int, chosen: list[int]) -> None:
        """Fill a layer's slots with these experts, in slot order (a synchronous copy)."""
        self.backend.set_resident(layer, chosen)
        self.slot_of[layer][:] = -1
        self.slot_of[layer][chosen] = np.arange(len(chosen))
        self.expert_in[layer][:] = -1
        self.expert_in[layer][: len(chosen)] = chosen

    def after_token(self, routing: dict[int, np.ndarray]) -> None:
        """Count the token's hits, commit the previous token's copies, admit this token's misses."""
        self.step += 1
        for layer, ids in routing.items():
            hit = int(np.count_nonzero(self.slot_of[layer][ids] >= 0))
            self.counters[layer].hits += hit
            self.counters[layer].misses += len(ids) - hit
        self._commit()
        for layer, ids in routing.items():
            self.policy.observe(layer, ids, self.step)
        self._admit(routing)

    def _commit(self) -> None:
        self.backend.commit()
        for layer, expert, slot in self.pending:
            self.slot_of[layer][expert] = slot
            self.expert_in[layer][slot] = expert
            self.busy[layer][slot] = False
        self.pending = []

    def _candidates(self, routing: dict[int, np.ndarray],
                    priorities: dict[int, np.ndarray]) -> list[tuple[float, int, int, int]]:
        """(-priority, fairness, layer, expert) of each missed expert of a layer with slots, best first."""
        found = []
        n_layers = max(1, len(self.layers))
        for rank, (layer, ids) in enumerate(sorted(routing.items())):
            if self.layers[layer].n_slots == 0:
                continue
            missed = ids[self.slot_of[layer][ids] < 0]
            if not missed.size:
                continue
            priority = priorities[layer] = self.policy.priority(layer, self.step)
            fairness = (rank - self.step) % n_layers
            found += [(-float(priority[e]), fairness, layer, e) for e in dict.fromkeys(missed.tolist())]
        found.sort()
        return found

    def _victims(self, layer: int, priority: np.ndarray) -> tuple[list[int], list[float]]:
        """The layer's slots in the order they give way: empty ones first (lowest slot first), then
        residents from the least valued; slots being copied never."""
        slots = self.expert_in[layer]
        values = np.where(slots >= 0, priority[np.maximum(slots, 0)], -np.inf)
        values[self.busy[layer]] = np.inf
        order = np.argsort(values, kind="stable")
        return order.tolist(), values[order].tolist()

    def _admit(self, routing: dict[int, np.ndarray]) -> None:
        """Admit candidates best first while the budget lasts; each takes its layer's next slot to give way
        if it is worth more than what that slot holds (else the layer takes no more this token)."""
        budget = self.budget()
        copied = 0
        admitted: dict[int, tuple[list[int], list[int]]] = {}
        priorities: dict[int, np.ndarray] = {}
        victims: dict[int, tuple[list[int], list[float]]] = {}
        taken: dict[int, int] = {}
        closed: set[int] = set()
        for neg_priority, _, layer, expert in self._candidates(routing, priorities):
            shape = self.layers[layer]
            if layer in closed or (budget is not None and copied + shape.slot_bytes > budget):
                continue
            if layer not in victims:
                victims[layer] = self._victims(layer, priorities[layer])
            order, values = victims[layer]
            k = taken.get(layer, 0)
            if k >= len(order) or not -neg_priority > values[k]:
                closed.add(layer)
                continue
            slot, taken[layer] = order[k], k + 1
            victim = int(self.expert_in[layer][slot])
            if victim >= 0:
                self.slot_of[layer][victim] = -1
                self.counters[layer].evictions += 1
            self.expert_in[layer][slot] = -1
            self.busy[layer][slot] = True
            self.pending.append((layer, expert, slot))
            experts, slots = admitted.setdefault(layer, ([], []))
            experts.append(expert)
            slots.append(slot)
            copied += shape.slot_bytes
            self.counters[layer].admissions += 1
            self.counters[layer].bytes_copied += shape.slot_bytes
        for layer, (experts, slots) in admitted.items():
            self.backend.admit(layer, experts, slots)
        self.copied_per_token.append(copied)

    def totals(self) -> LayerCounters:
        total = LayerCounters()
        for c in self.counters.values():
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(c, name))
        return total

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


class PluginSlots(SlotBackend):
    """The slot table's decisions, carried out by the scheduler plugin."""

    def __init__(self, plugin) -> None:
        self.plugin = plugin

    def set_resident(self, layer: int, experts: list[int]) -> None:
        self.plugin.set_resident(layer, experts)

    def admit(self, layer: int, experts: list[int], slots: list[int]) -> None:
        self.plugin.admit(layer, experts, slots)

    def commit(self) -> None:
        self.plugin.commit()


class Rotation:
    """A loaded model's rotation: the plugin records each step's routing, the Rotator decides, the plugin
    copies. The copy budget per token is COPY_BUDGET_SHARE of the PCIe bytes of the measured token time
    (exponential average), unless a fixed budget is given. Routing can be written to a trace as it goes."""

    def __init__(self, plugin, layers: dict[int, LayerShape], policy: str = DEFAULT_POLICY, *,
                 pcie_gbs: float = 0.0, budget_bytes: int | None = None, prior: dict[int, np.ndarray] | None = None,
                 rotate: bool = True, trace=None, replay=None,
                 observer: Callable[[str, dict[int, np.ndarray]], None] | None = None) -> None:
        self.plugin, self.layers, self.trace, self.rotate, self.replay = plugin, layers, trace, rotate, replay
        self.observer = observer  # sees every step's routing ("prompt" or "decode")
        # The plugin keeps every step's routing for us only when something reads it.
        self.recording = bool(rotate or trace or observer or any(s.n_slots for s in layers.values()))
        self.fixed_budget, self.pcie_gbs = budget_bytes, pcie_gbs
        self.token_seconds: float | None = None
        self._last = 0.0
        self.rotator = Rotator(layers, make_policy(policy, layers, prior), self.budget, PluginSlots(plugin))
        plugin.set_recording(self.recording)
        if replay is not None:
            for layer, ids in replay_ids(replay, layers).items():
                plugin.set_replay(layer, ids)

    @property
    def slots(self) -> dict[int, int]:
        return {layer: s.n_slots for layer, s in self.layers.items() if s.n_slots}

    def budget(self) -> int | None:
        if self.fixed_budget is not None:
            return self.fixed_budget
        if not self.pcie_gbs or self.token_seconds is None:
            return None
        return int(COPY_BUDGET_SHARE * self.pcie_gbs * 1e9 * self.token_seconds)

    def seed_from_popularity(self, popularity: dict[int, np.ndarray]) -> None:
        """Before any request: each layer's slots take its most popular experts over the calibration set."""
        for layer, shape in self.layers.items():
            if shape.n_slots and layer in popularity:
                chosen = [int(e) for e in np.argsort(-np.asarray(popularity[layer]), kind="stable")[: shape.n_slots]]
                self.rotator.set_resident(layer, chosen)

    def _record(self, phase: str, routing: dict[int, np.ndarray]) -> None:
        if self.trace:
            self.trace.write_step(phase, routing)
        if self.observer:
            self.observer(phase, routing)

    def _take(self) -> dict[int, np.ndarray]:
        return {layer: self.plugin.take_routing(layer) for layer in self.layers} if self.recording else {}

    def before_prompt(self) -> None:
        self.plugin.commit()
        self._take()  # routing of anything evaluated outside a request
        self.plugin.reset_stats()

    def after_prompt(self) -> None:
        routing = self._take()
        self._record("prompt", routing)
        self.rotator.after_prompt(routing)
        self.plugin.reset_stats()
        self.rotator.counters = {layer: LayerCounters() for layer in self.layers}
        self._last = time.perf_counter()

    def after_token(self) -> None:
        now = time.perf_counter()
        elapsed = now - self._last
        self.token_seconds = elapsed if self.token_seconds is None else 0.8 * self.token_seconds + 0.2 * elapsed
        routing = self._take()
        self._record("decode", routing)
        if self.rotate:
            self.rotator.after_token(routing)
        self._last = time.perf_counter()

    def layer_stats(self):
        return [self.plugin.layer_stats(layer) for layer in self.plugin.layers]

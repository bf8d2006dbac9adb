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
    """How valuable each expert of each layer is, after the routing seen so far (higher: keep it). State is
    one [layers, experts] array (layers in sorted order), so one token's update is a few array operations."""

    name = ""

    def __init__(self, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> None:
        self.layers = layers
        self.row = {layer: i for i, layer in enumerate(sorted(layers))}
        self.width = max((s.n_expert for s in layers.values()), default=1)

    def observe_all(self, rows: np.ndarray, ids: np.ndarray, step: int) -> None:
        """One decoded token: expert ids[i] was selected in layer row rows[i]."""
        raise NotImplementedError

    def priority_all(self, step: int) -> np.ndarray:
        """[layers, experts] values at this step."""
        raise NotImplementedError

    def observe_prompt(self, layer: int, ids: np.ndarray, step: int) -> None:
        """A request's prompt batch: by default, as if its tokens had been decoded at this step."""
        self.observe_all(np.full(len(ids), self.row[layer]), ids, step)


class LRU(Policy):
    """Least recently used: an expert is worth the step it was last selected in."""

    name = "lru"

    def __init__(self, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> None:
        super().__init__(layers)
        self.last = np.full((len(layers), self.width), -1.0)

    def observe_all(self, rows: np.ndarray, ids: np.ndarray, step: int) -> None:
        self.last[rows, ids] = step

    def priority_all(self, step: int) -> np.ndarray:
        return self.last


class DecayedLFU(Policy):
    """Least frequently used with exponential decay: every selection adds 1, every token multiplies the
    scores by LFU_DECAY (so a topic change is forgotten in ~1/(1-decay) tokens)."""

    name = "lfu"

    def __init__(self, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> None:
        super().__init__(layers)
        self.score = np.zeros((len(layers), self.width))
        self.step = np.zeros(len(layers), dtype=np.int64)  # the step each row's scores are decayed to

    def observe_all(self, rows: np.ndarray, ids: np.ndarray, step: int) -> None:
        seen = np.unique(rows)
        self.score[seen] *= (LFU_DECAY ** (step - self.step[seen]))[:, None]
        np.add.at(self.score, (rows, ids), 1.0)
        self.step[seen] = step

    def priority_all(self, step: int) -> np.ndarray:
        return self.score * (LFU_DECAY ** (step - self.step))[:, None]


class Hybrid(DecayedLFU):
    """Decayed LFU plus two priors that do not decay: the request's prompt routing and, when the model
    was calibrated, its popularity over the calibration set (each normalised to mean 1 over the layer's
    experts and weighted by HYBRID_PRIOR_WEIGHT of the steady-state mean score)."""

    name = "hybrid"

    def __init__(self, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> None:
        super().__init__(layers)
        self.scale = np.array([HYBRID_PRIOR_WEIGHT * s.n_used / s.n_expert / (1 - LFU_DECAY)
                               for _, s in sorted(layers.items())])[:, None]
        self.calibration = np.zeros((len(layers), self.width))
        self.request = np.zeros((len(layers), self.width))
        for layer, s in layers.items():
            if prior and layer in prior:
                self.calibration[self.row[layer], : s.n_expert] = _unit_mean(prior[layer])

    def observe_prompt(self, layer: int, ids: np.ndarray, step: int) -> None:
        super().observe_prompt(layer, ids, step)
        n = self.layers[layer].n_expert
        self.request[self.row[layer], :n] = _unit_mean(np.bincount(ids, minlength=n))

    def priority_all(self, step: int) -> np.ndarray:
        return super().priority_all(step) + self.scale * (self.request + self.calibration)


def _unit_mean(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values / values.mean() if values.mean() > 0 else np.zeros_like(values)


def make_policy(name: str, layers: dict[int, LayerShape], prior: dict[int, np.ndarray] | None = None) -> Policy:
    classes = {cls.name: cls for cls in (LRU, DecayedLFU, Hybrid)}
    if name not in classes:
        raise RotationError(f"unknown rotation policy {name!r}; known: {', '.join(POLICIES)}")
    return classes[name](layers, prior)


def can_rotate(layers: dict[int, LayerShape]) -> bool:
    """Whether any layer's slots can change: some but not all of its experts fit (no slots: the plugin only
    counts; every expert resident: nothing to move)."""
    return any(0 < s.n_slots < s.n_expert for s in layers.values())


def _in_place(chosen: list[int], current: np.ndarray) -> list[int]:
    """The chosen experts in slot order, those already resident left in their slots, so that only the
    newcomers are copied (a request's seeding moves what changed, not every slot)."""
    if len(chosen) != len(current) or len(set(chosen)) != len(chosen):
        return chosen
    stay = set(chosen) & set(current.tolist())
    newcomers = iter(e for e in chosen if e not in stay)
    return [int(e) if e in stay else next(newcomers) for e in current.tolist()]


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

    `budget()` gives the bytes that may be copied after a decoded token (None: no limit). The tables are
    [layers, experts] and [layers, slots] arrays (slots beyond a layer's count are never used);
    `slot_of[layer]`, `expert_in[layer]` and `busy[layer]` are views of one layer's rows."""

    layers: dict[int, LayerShape]
    policy: Policy
    budget: Callable[[], int | None] = lambda: None
    backend: SlotBackend = field(default_factory=SlotBackend)
    step: int = 0

    def __post_init__(self) -> None:
        order = sorted(self.layers)
        self.row = {layer: i for i, layer in enumerate(order)}
        width = max((s.n_expert for s in self.layers.values()), default=1)
        depth = max((s.n_slots for s in self.layers.values()), default=0)
        self._slot_of = np.full((len(order), width), -1, dtype=np.int64)
        self._expert_in = np.full((len(order), depth), -1, dtype=np.int64)
        self._busy = np.zeros((len(order), depth), dtype=bool)  # being copied (or beyond the layer's slots)
        for layer, s in self.layers.items():
            self._busy[self.row[layer], s.n_slots:] = True
        self.slot_of = {layer: self._slot_of[i, : self.layers[layer].n_expert] for layer, i in self.row.items()}
        self.expert_in = {layer: self._expert_in[i, : self.layers[layer].n_slots] for layer, i in self.row.items()}
        self.busy = {layer: self._busy[i, : self.layers[layer].n_slots] for layer, i in self.row.items()}
        self._slot_bytes = [self.layers[layer].slot_bytes for layer in order]
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
        """Fill a layer's slots with these experts (a synchronous copy): those already resident stay in their
        slots, the others take the remaining slots in the order given, so only newcomers are copied."""
        chosen = _in_place(list(chosen), self.expert_in[layer][: len(chosen)])
        self.backend.set_resident(layer, chosen)
        self.slot_of[layer][:] = -1
        self.slot_of[layer][chosen] = np.arange(len(chosen))
        self.expert_in[layer][:] = -1
        self.expert_in[layer][: len(chosen)] = chosen

    def after_token(self, routing: dict[int, np.ndarray]) -> None:
        """Count the token's hits, commit the previous token's copies, admit this token's misses."""
        self.step += 1
        layers = sorted(routing)
        counts = [len(routing[layer]) for layer in layers]
        # Integer arrays even when no layer routed anything (no layer with slots records: the plugin only counts).
        rows = np.repeat(np.array([self.row[layer] for layer in layers], dtype=np.int64), counts)
        ids = (np.concatenate([routing[layer] for layer in layers]).astype(np.int64) if layers
               else np.empty(0, np.int64))
        hits = np.bincount(rows, weights=self._slot_of[rows, ids] >= 0, minlength=len(self.row))
        for layer, n in zip(layers, counts, strict=True):
            hit = int(hits[self.row[layer]])
            self.counters[layer].hits += hit
            self.counters[layer].misses += n - hit
        self._commit()
        self.policy.observe_all(rows, ids, self.step)
        self._admit(layers, rows, ids)

    def _commit(self) -> None:
        self.backend.commit()
        if self.pending:
            layer_rows = [self.row[layer] for layer, _, _ in self.pending]
            experts = [expert for _, expert, _ in self.pending]
            slots = [slot for _, _, slot in self.pending]
            self._slot_of[layer_rows, experts] = slots
            self._expert_in[layer_rows, slots] = experts
            self._busy[layer_rows, slots] = False
        self.pending = []

    def _candidates(self, layers: list[int], rows: np.ndarray, ids: np.ndarray,
                    priority: np.ndarray) -> list[tuple[int, int]]:
        """(row, expert) of each missed expert of a layer with slots, best first: by priority, then by a
        rotating layer order (so no layer is always first to the budget), then layer and expert."""
        with_slots = np.array([self.layers[layer].n_slots > 0 for layer in layers], dtype=bool)
        rank = np.full(len(self.row), 0)
        rank[[self.row[layer] for layer in layers]] = np.arange(len(layers))
        keep = (self._slot_of[rows, ids] < 0) & with_slots[rank[rows]] if len(ids) else np.zeros(0, bool)
        pairs = np.unique(rows[keep] * priority.shape[1] + ids[keep])
        c_rows, c_ids = pairs // priority.shape[1], pairs % priority.shape[1]
        fairness = (rank[c_rows] - self.step) % max(1, len(self.layers))
        order = np.lexsort((c_ids, c_rows, fairness, -priority[c_rows, c_ids]))
        return list(zip(c_rows[order].tolist(), c_ids[order].tolist(), strict=True))

    def _victims(self, priority: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
        """Every layer's slots in the order they give way: empty ones first (lowest slot first), then
        residents from the least valued; slots being copied never."""
        slots = self._expert_in
        values = np.where(slots >= 0, np.take_along_axis(priority, np.maximum(slots, 0), axis=1), -np.inf)
        values[self._busy] = np.inf
        order = np.argsort(values, axis=1, kind="stable")
        return order.tolist(), np.take_along_axis(values, order, axis=1).tolist()

    def _admit(self, layers: list[int], rows: np.ndarray, ids: np.ndarray) -> None:
        """Admit candidates best first while the budget lasts; each takes its layer's next slot to give way
        if it is worth more than what that slot holds (else the layer takes no more this token)."""
        budget = self.budget()
        priority = self.policy.priority_all(self.step)
        candidates = self._candidates(layers, rows, ids, priority)
        copied = 0
        admitted: dict[int, tuple[list[int], list[int]]] = {}
        if candidates:
            order, values = self._victims(priority)
            taken = [0] * len(self.row)
            closed: set[int] = set()
            layer_of = sorted(self.layers)
            for row, expert in candidates:
                size = self._slot_bytes[row]
                if row in closed or (budget is not None and copied + size > budget):
                    continue
                k = taken[row]
                if k >= len(order[row]) or not priority[row, expert] > values[row][k]:
                    closed.add(row)
                    continue
                slot, taken[row] = order[row][k], k + 1
                layer = layer_of[row]
                victim = int(self._expert_in[row, slot])
                if victim >= 0:
                    self._slot_of[row, victim] = -1
                    self.counters[layer].evictions += 1
                self._expert_in[row, slot] = -1
                self._busy[row, slot] = True
                self.pending.append((layer, expert, slot))
                experts, slots = admitted.setdefault(layer, ([], []))
                experts.append(expert)
                slots.append(slot)
                copied += size
                self.counters[layer].admissions += 1
                self.counters[layer].bytes_copied += size
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
        # (Prompt seeding needs it too, unless no layer has slots or every expert is resident.)
        self.recording = bool(rotate or trace or observer or can_rotate(layers))
        self.fixed_budget, self.pcie_gbs = budget_bytes, pcie_gbs
        self.copy_gbs: float | None = None  # the copier's measured rate, once it has copied
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
        for layer, shape in self.layers.items():
            if shape.n_slots and layer in popularity:
                chosen = [int(e) for e in np.argsort(-np.asarray(popularity[layer]), kind="stable")[: shape.n_slots]]
                self.rotator.set_resident(layer, chosen)

    def watch(self, observer: Callable[[str, dict[int, np.ndarray]], None]) -> None:
        """From now on, observer(phase, routing) sees every step's routing ("prompt" or "decode")."""
        self.observer = observer
        self.recording = True
        self.plugin.set_recording(True)

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
            self._measure_copier()
            self.rotator.after_token(routing)
        self._last = time.perf_counter()

    def layer_stats(self):
        return [self.plugin.layer_stats(layer) for layer in self.plugin.layers]

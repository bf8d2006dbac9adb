"""The VRAM budget planner: pure functions from a model index and a profile to a placement.

VRAM is spent on the part that must be there first (attention, norms, routers, shared experts, output
head; the KV cache for the context; the compute buffer; the GPU runtime's own overhead), then on whole
layers of routed experts. Experts that do not fit stay in the memory-mapped GGUF in host RAM, which
llama.cpp is told through tensor buffer-type overrides. The token embedding stays on the host, as
llama.cpp keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex, TensorClass
from rotary_gguf.profile import Profile

STRATEGIES = ("layer-fill", "experts-on-host", "rotary")
# Prompt batches above this many tokens are left to llama.cpp's own GPU offload of host experts, which
# starts at 32 tokens (GGML_OP_OFFLOAD_MIN_BATCH); the rotary plugin takes the smaller ones.
ROTARY_MAX_BATCH_GPU = 32
LAYER_ORDERS = ("first", "last")  # which layers' experts get VRAM first
# Bytes per element of each KV cache type (block types: block bytes / 32 elements).
KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32,
                        "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
# Matches every routed-expert tensor of a layer: stacked (also fused gate_up and chunked), and the older
# one-tensor-per-expert layout. Extends llama.cpp's --cpu-moe pattern (common/common.h).
_EXPERT_SUFFIX = r"\.(ffn_(up|down|gate|gate_up)_(ch|)exps|ffn_(up|down|gate)\.[0-9]+\.)"
_HOST_CLASSES = (TensorClass.ROUTED_EXPERT, TensorClass.EXPERT_BIAS)


class PlanError(RotaryError):
    """No placement fits the budget, or the request cannot be planned."""


@dataclass(frozen=True)
class Override:
    """One llama.cpp tensor buffer-type override: tensors whose name matches `pattern` go to `buffer`."""

    pattern: str
    buffer: str  # "CPU": host memory, zero-copy in the mmap; "GPU": the first GPU's memory; "RPC0[host:port]"


@dataclass(frozen=True)
class RemoteShare:
    """Whole layers of routed experts on one remote device of an RPC server (rotary_gguf.rpc)."""

    buffer: str  # llama.cpp's name of the device's buffer type, RPC<device>[host:port]
    layers: tuple[int, ...]
    weight_bytes: int
    compute_bytes: int  # the device's compute buffer for those layers (planned)
    free_bytes: int  # what the server reported free

    def to_json(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "layers": list(self.layers), "weight_bytes": self.weight_bytes,
                "compute_bytes": self.compute_bytes, "free_bytes": self.free_bytes}


@dataclass(frozen=True)
class Placement:
    """Where every part of a model goes, and what that is predicted to cost."""

    strategy: str
    profile: str
    dense: bool
    vram_budget_bytes: int
    ctx: int
    kv_cache_type: str
    n_layer: int
    n_gpu_layers: int  # llama.cpp's n_gpu_layers: MoE models offload all layers and keep experts back
    gpu_weight_bytes: int  # non-expert weights in VRAM
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    gpu_expert_layers: tuple[int, ...]
    gpu_expert_bytes: int
    host_weight_bytes: int  # weights left in the mmap
    host_compute_bytes: int
    overrides: tuple[Override, ...]
    expert_slots: tuple[tuple[int, int], ...] = ()  # rotary: (layer, VRAM slots) for each MoE layer
    slot_bytes: int = 0  # rotary: VRAM of the slots and the plugin's scratch (invisible to llama.cpp)
    device_read_share: float = 0.0  # rotary: predicted share of expert reads served from VRAM
    calibrated: bool = False  # rotary: that share comes from calibration popularity (else uniform routing)
    state_bytes: int = 0  # recurrent state (conv + SSM) of hybrid models, beside the KV cache
    remote: tuple[RemoteShare, ...] = ()  # expert layers on RPC servers (not in host_weight_bytes)

    @property
    def predicted_vram_bytes(self) -> int:
        if not self.vram_budget_bytes:
            return 0
        return (self.gpu_weight_bytes + self.gpu_expert_bytes + self.slot_bytes + self.kv_bytes + self.state_bytes
                + self.compute_bytes + self.overhead_bytes)

    @property
    def predicted_host_bytes(self) -> int:
        kv_on_host = 0 if self.vram_budget_bytes else self.kv_bytes + self.state_bytes
        return self.host_weight_bytes + self.host_compute_bytes + kv_on_host

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "profile": self.profile, "dense": self.dense,
            "vram_budget_bytes": self.vram_budget_bytes, "ctx": self.ctx, "kv_cache_type": self.kv_cache_type,
            "n_gpu_layers": self.n_gpu_layers, "predicted_vram_bytes": self.predicted_vram_bytes,
            "predicted_host_bytes": self.predicted_host_bytes, "gpu_weight_bytes": self.gpu_weight_bytes,
            "gpu_expert_bytes": self.gpu_expert_bytes, "kv_bytes": self.kv_bytes,
            "state_bytes": self.state_bytes,
            "compute_bytes": self.compute_bytes, "overhead_bytes": self.overhead_bytes,
            "host_weight_bytes": self.host_weight_bytes, "host_compute_bytes": self.host_compute_bytes,
            "gpu_expert_layers": list(self.gpu_expert_layers),
            "cpu_expert_layers": [i for i in range(self.n_layer) if i not in self.gpu_expert_layers
                                  and not any(i in r.layers for r in self.remote)],
            "overrides": [{"pattern": o.pattern, "buffer": o.buffer} for o in self.overrides],
            "expert_slots": {str(layer): n for layer, n in self.expert_slots}, "slot_bytes": self.slot_bytes,
            "predicted_device_read_share": round(self.device_read_share, 4), "calibrated": self.calibrated,
            "remote": [r.to_json() for r in self.remote],
        }


def kv_cache_bytes(index: ModelIndex, ctx: int, kv_cache_type: str, n_layers: int | None = None, *,
                   flash_attention: bool = True) -> int:
    """K and V for `ctx` tokens in the first n_layers layers (default all), as llama.cpp sizes them
    (index.layer_memory): per layer n_head_kv x (key_length + value_length) elements per token, the SWA
    head sizes in sliding-window layers, which keep a full-size cache (llama.cpp's default swa_full);
    recurrent layers, layers sharing another's cache and NextN blocks hold none; MLA models store their
    latent this way too. Without flash attention V rows are padded to the widest layer's. deepseek4's
    compressed caches hold GGML_PAD(ceil(ctx / ratio), 256) cells."""
    per_element = KV_BYTES_PER_ELEMENT[kv_cache_type]
    layers = index.layer_memory[: index.params.n_layer if n_layers is None else n_layers]
    return sum(int(math.ceil(m.kv_k * per_element * ctx))
               + int(math.ceil((m.kv_v if flash_attention else m.kv_v_transposed) * per_element * ctx))
               + sum(int(math.ceil(_compressed_cells(ctx, ratio) * elements * per_element))
                     for ratio, elements in m.compressed)
               for m in layers)


def _compressed_cells(ctx: int, ratio: int) -> int:
    return -(-max(1, -(-ctx // ratio)) // 256) * 256


def recurrent_state_bytes(index: ModelIndex, n_seq: int = 1) -> int:
    """Conv + SSM state of the recurrent layers (hybrid models), F32, for n_seq sequences: llama.cpp's RS
    buffer (llama-memory-recurrent.cpp sizes r_l/s_l from n_embd_r()/n_embd_s() x max(1, n_seq_max))."""
    return max(1, n_seq) * sum(m.recurrent_bytes for m in index.layer_memory)


def compressor_state_bytes(index: ModelIndex, n_seq: int = 1) -> int:
    """deepseek4's compressor state (F32 kv and score rows of the CSA, HCA and indexer compressors) for n_seq
    sequences: llama.cpp's `DSV4 ... state` buffers."""
    return max(1, n_seq) * sum(m.compressor_bytes for m in index.layer_memory)


def state_bytes(index: ModelIndex) -> int:
    """Per-sequence state besides the KV cache: recurrent (RS) and compressor state, one sequence."""
    return recurrent_state_bytes(index) + compressor_state_bytes(index)


def compute_buffer_bytes(index: ModelIndex, ctx: int, ubatch: int, flash_attention: bool) -> int:
    """llama.cpp's compute buffer for one ubatch: logits and the widest activations of the ubatch, plus
    the KQ mask (and without flash attention the scores of every head). An upper bound fitted to the
    CPU backend's reports over model shapes, contexts and ubatches (1.1x to 3.1x of them, tests/test_plan.py)
    so that VRAM is never overrun; the output logits dominate for real vocabularies."""
    p = index.params
    ffn_width = max(p.n_expert_used * p.n_ff_exp, p.n_ff_shexp)
    activations = ubatch * 4 * (p.n_vocab + 8 * p.n_embd + ffn_width)
    attention = ubatch * ctx * (4 if flash_attention else 4 * (p.n_head + 1))
    return int(1.2 * (activations + attention))


def _state_note(state: int) -> str:
    return f", recurrent/compressor state ({state / 2**30:.2f})" if state else ""


def _bytes_in_layer(index: ModelIndex, layer: int, classes: tuple[TensorClass, ...]) -> int:
    row = index.bytes_by_layer.get(layer, {})
    return sum(row.get(c.value, 0) for c in classes)


def expert_pattern(layers: list[int]) -> str:
    """A regex matching the routed-expert tensors of these layers."""
    return rf"^blk\.({'|'.join(str(i) for i in layers)}){_EXPERT_SUFFIX}"


def _fixed_vram(index: ModelIndex, profile: Profile, ctx: int) -> tuple[int, int, int, int, int]:
    """(non-expert weights, KV, recurrent state, compute, overhead) that VRAM must hold before any expert."""
    c = index.loaded_bytes_by_class
    host = c[TensorClass.TOKEN_EMBEDDING.value] + sum(c[k.value] for k in _HOST_CLASSES)
    weights = sum(c.values()) - host
    kv = kv_cache_bytes(index, ctx, profile.kv_cache_type, flash_attention=profile.flash_attention)
    compute = compute_buffer_bytes(index, ctx, profile.ubatch, profile.flash_attention)
    return weights, kv, state_bytes(index), compute, profile.gpu_overhead_bytes


def _largest_fitting_ctx(index: ModelIndex, profile: Profile, budget: int, ctx: int) -> int:
    """The largest multiple of 256 below ctx whose fixed VRAM fits the budget (0 if none)."""
    lo, hi = 0, ctx // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(_fixed_vram(index, profile, mid * 256)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def _check_fits(fixed: tuple[int, ...], budget: int, index: ModelIndex, profile: Profile, ctx: int) -> None:
    weights, kv, state, compute, overhead = fixed
    need = sum(fixed)
    if need <= budget:
        return
    fit_ctx = _largest_fitting_ctx(index, profile, budget, ctx)
    hint = f"try --ctx {fit_ctx}" if fit_ctx else "use a smaller model or quantization, or a larger budget"
    raise PlanError(
        f"needs {need / 2**30:.2f} GiB for attention+norms+routers+output ({weights / 2**30:.2f}), "
        f"KV cache ({kv / 2**30:.2f}){_state_note(state)} at ctx {ctx}, compute ({compute / 2**30:.2f}) "
        f"and GPU runtime ({overhead / 2**30:.2f}); budget {budget / 2**30:.2f} GiB; {hint}"
    )


def plan_placement(index: ModelIndex, profile: Profile, *, strategy: str = "layer-fill",
                   vram_budget: int | None = None, ctx: int | None = None, layer_order: str = "first",
                   max_expert_layers: int | None = None, popularity: dict[int, Any] | None = None) -> Placement:
    """Place `index` under `profile` (budget and context from the profile unless given).

    layer-fill: whole layers of experts go to VRAM while they fit, in `layer_order` ("first": layers
    0, 1, ... get VRAM and the last layers stay on the CPU; "last": the reverse, llama.cpp's --n-cpu-moe);
    at most max_expert_layers of them when given (llama.cpp's --n-cpu-moe values below the fitting one).
    experts-on-host: every routed expert stays in the mmap (llama.cpp's --cpu-moe).
    rotary: every routed expert stays in the mmap, and the VRAM left over holds per-layer expert slots
    that the scheduler plugin serves expert reads from (the same number in every layer, one more in the
    first layers while the remainder allows). `popularity` (per layer, each expert's share of selections
    from calibration) makes the predicted share of reads served from VRAM that of the most popular
    experts instead of uniform routing's.
    """
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown placement {strategy!r}; known: {', '.join(STRATEGIES)}")
    if layer_order not in LAYER_ORDERS:
        raise PlanError(f"unknown layer order {layer_order!r}; known: {', '.join(LAYER_ORDERS)}")
    p = index.params
    # The profile's context is a default: a model trained on less gets its own length.
    ctx = ctx or min(profile.ctx, p.n_ctx_train or profile.ctx)
    budget = profile.vram_budget_bytes if vram_budget is None else vram_budget
    if p.n_ctx_train and ctx > p.n_ctx_train:
        raise PlanError(f"ctx {ctx} is beyond the model's training context ({p.n_ctx_train}); "
                        f"use --ctx {p.n_ctx_train} or less")
    if profile.vram_total_bytes and budget > profile.vram_total_bytes:
        raise PlanError(f"VRAM budget {budget / 2**30:.2f} GiB is more than the GPU's "
                        f"{profile.vram_total_bytes / 2**30:.2f} GiB (profile {profile.name})")
    block = 1 if KV_BYTES_PER_ELEMENT[profile.kv_cache_type] >= 2 else 32
    if p.head_dim_k % block or p.head_dim_v % block:
        raise PlanError(f"KV cache type {profile.kv_cache_type} needs head dimensions divisible by {block} "
                        f"(this model: {p.head_dim_k}/{p.head_dim_v}); use a profile with kv_cache_type f16")
    if not index.is_moe:
        return _plan_dense(index, profile, budget, ctx)
    host_compute = compute_buffer_bytes(index, ctx, profile.ubatch, profile.flash_attention)
    all_bytes = sum(index.loaded_bytes_by_class.values())
    common = dict(profile=profile.name, dense=False, ctx=ctx, kv_cache_type=profile.kv_cache_type,
                  n_layer=p.n_layer, strategy=strategy)
    all_experts_on_host = (Override(expert_pattern(list(index.moe_layers)), "CPU"),)
    if budget <= 0 or not profile.has_gpu:
        # No GPU: everything runs on the CPU, experts still zero-copy in the mmap (not repacked copies).
        return Placement(**common, vram_budget_bytes=0, n_gpu_layers=0, gpu_weight_bytes=0,
                         kv_bytes=kv_cache_bytes(index, ctx, profile.kv_cache_type,
                                                 flash_attention=profile.flash_attention),
                         state_bytes=state_bytes(index), compute_bytes=0,
                         overhead_bytes=0, gpu_expert_layers=(), gpu_expert_bytes=0, host_weight_bytes=all_bytes,
                         host_compute_bytes=host_compute, overrides=all_experts_on_host,
                         expert_slots=tuple((layer, 0) for layer in index.moe_layers) if strategy == "rotary" else ())
    fixed = _fixed_vram(index, profile, ctx)
    _check_fits(fixed, budget, index, profile, ctx)
    if strategy == "rotary":
        return _plan_rotary(index, budget, fixed, common, all_bytes, host_compute, all_experts_on_host, popularity)
    gpu_layers = []
    if strategy == "layer-fill":
        room = budget - sum(fixed)
        order = list(index.moe_layers) if layer_order == "first" else list(reversed(index.moe_layers))
        for layer in order:
            size = _bytes_in_layer(index, layer, _HOST_CLASSES)
            if size > room or len(gpu_layers) == max_expert_layers:
                break
            gpu_layers.append(layer)
            room -= size
    gpu_layers.sort()
    gpu_expert_bytes = sum(_bytes_in_layer(index, layer, _HOST_CLASSES) for layer in gpu_layers)
    cpu_layers = [layer for layer in index.moe_layers if layer not in gpu_layers]
    overrides = (Override(expert_pattern(cpu_layers), "CPU"),) if cpu_layers else ()
    weights, kv, state, compute, overhead = fixed
    return Placement(**common, vram_budget_bytes=budget, n_gpu_layers=p.n_layer + 1, gpu_weight_bytes=weights,
                     kv_bytes=kv, state_bytes=state, compute_bytes=compute, overhead_bytes=overhead,
                     gpu_expert_layers=tuple(gpu_layers),
                     gpu_expert_bytes=gpu_expert_bytes, host_weight_bytes=all_bytes - weights - gpu_expert_bytes,
                     host_compute_bytes=host_compute if cpu_layers else 0, overrides=overrides)


def rotary_scratch_bytes(index: ModelIndex) -> int:
    """VRAM the plugin's device worker needs for one expert matmul: the gathered input rows, ids and output
    rows of up to ROTARY_MAX_BATCH_GPU tokens x n_expert_used experts."""
    weights = index.stacked_expert_weights
    if not weights:
        return 0
    widest = max(t.shape[0] for t in weights) + max(t.shape[1] for t in weights) + 1
    return ROTARY_MAX_BATCH_GPU * index.params.n_expert_used * widest * 4


def _read_share(slots: dict[int, int], n_expert: dict[int, int], popularity: dict[int, Any] | None) -> float:
    """Mean over layers of the share of expert reads the slots serve: the most popular experts' share when
    popularity is known, else slots / experts (uniform routing)."""
    shares = []
    for layer, k in slots.items():
        if layer in (popularity or {}):
            p = sorted((float(x) for x in popularity[layer]), reverse=True)
            shares.append(sum(p[:k]) / (sum(p) or 1.0))
        elif n_expert.get(layer):
            shares.append(k / n_expert[layer])
    return sum(shares) / len(shares) if shares else 0.0


def _plan_rotary(index: ModelIndex, budget: int, fixed: tuple[int, int, int, int, int], common: dict[str, Any],
                 all_bytes: int, host_compute: int, overrides: tuple[Override, ...],
                 popularity: dict[int, Any] | None) -> Placement:
    p = index.params
    scratch = rotary_scratch_bytes(index)
    per_layer = {layer: index.slot_bytes(layer) for layer in index.moe_layers}
    room = max(0, budget - sum(fixed) - scratch)
    per_slot_row = sum(per_layer.values())
    n_expert = {t.layer: t.shape[2] for t in index.stacked_expert_weights}
    uniform = min(room // per_slot_row if per_slot_row else 0, min(n_expert.values(), default=0))
    slots = {layer: uniform for layer in per_layer}
    room -= uniform * per_slot_row
    for layer, size in per_layer.items():
        if slots[layer] < n_expert.get(layer, 0) and size <= room:
            slots[layer] += 1
            room -= size
    slot_bytes = sum(slots[layer] * size for layer, size in per_layer.items())
    share = _read_share(slots, n_expert, popularity)
    weights, kv, state, compute, overhead = fixed
    return Placement(**common, vram_budget_bytes=budget, n_gpu_layers=p.n_layer + 1, gpu_weight_bytes=weights,
                     kv_bytes=kv, state_bytes=state, compute_bytes=compute, overhead_bytes=overhead,
                     gpu_expert_layers=(),
                     gpu_expert_bytes=0, host_weight_bytes=all_bytes - weights, host_compute_bytes=host_compute,
                     overrides=overrides, expert_slots=tuple(sorted(slots.items())),
                     slot_bytes=slot_bytes + (scratch if slot_bytes else 0), device_read_share=share,
                     calibrated=bool(popularity))


def _plan_dense(index: ModelIndex, profile: Profile, budget: int, ctx: int) -> Placement:
    """A dense model runs with whole layers on the GPU (llama.cpp's n_gpu_layers), as many as fit; each layer
    brings its own KV cache and state (index.layer_memory)."""
    p = index.params
    all_bytes = sum(index.loaded_bytes_by_class.values())
    compute = compute_buffer_bytes(index, ctx, profile.ubatch, profile.flash_attention)
    kv_to = [kv_cache_bytes(index, ctx, profile.kv_cache_type, n_layers=n, flash_attention=profile.flash_attention)
             for n in range(p.n_layer + 1)]
    memory = [kv_to[i + 1] - kv_to[i] + m.recurrent_bytes + m.compressor_bytes
              for i, m in enumerate(index.layer_memory)]
    room = budget - compute - profile.gpu_overhead_bytes - index.loaded_bytes_by_class[TensorClass.OUTPUT_HEAD.value]
    n_gpu, gpu_bytes = 0, 0
    if profile.has_gpu and budget > 0:
        for layer in range(p.n_layer):
            size = sum(index.bytes_by_layer.get(layer, {}).values()) + memory[layer]
            if size > room:
                break
            room -= size
            n_gpu, gpu_bytes = n_gpu + 1, gpu_bytes + size - memory[layer]
    on_gpu = n_gpu > 0
    layers = n_gpu if on_gpu else p.n_layer
    return Placement(strategy="layer-fill", profile=profile.name, dense=True, vram_budget_bytes=budget if on_gpu else 0,
                     ctx=ctx, kv_cache_type=profile.kv_cache_type, n_layer=p.n_layer, n_gpu_layers=n_gpu,
                     gpu_weight_bytes=gpu_bytes, kv_bytes=kv_to[layers],
                     state_bytes=sum(memory[:layers]) - kv_to[layers], compute_bytes=compute if on_gpu else 0,
                     overhead_bytes=profile.gpu_overhead_bytes if on_gpu else 0, gpu_expert_layers=(),
                     gpu_expert_bytes=0, host_weight_bytes=all_bytes - gpu_bytes, host_compute_bytes=compute,
                     overrides=())


def dense_read_bytes(index: ModelIndex) -> int:
    """Weight bytes every decoded token reads besides its routed experts (the token embedding is one row)."""
    skip = {c.value for c in _HOST_CLASSES} | {TensorClass.TOKEN_EMBEDDING.value}
    return sum(n for cls, n in index.loaded_bytes_by_class.items() if cls not in skip)


def estimate_decode_tok_s(index: ModelIndex, placement: Placement, profile: Profile) -> float:
    """Decode speed if every token is bound by reading its weights: the non-expert weights and the used
    experts of each layer, from VRAM at the GPU's bandwidth or from RAM at the host's (profile hints)."""
    p = index.params
    dense_bytes = dense_read_bytes(index)
    gpu_bytes = host_bytes = 0.0
    on_gpu = placement.vram_budget_bytes > 0
    for layer in index.moe_layers:
        used = p.n_expert_used * index.expert_bytes(layer)
        on_device = 1.0 if layer in placement.gpu_expert_layers else placement.device_read_share
        gpu_bytes += used * on_device
        host_bytes += used * (1 - on_device)
    if on_gpu:
        gpu_bytes += dense_bytes
    else:
        host_bytes += dense_bytes
    seconds = 0.0
    if gpu_bytes:
        seconds += gpu_bytes / (profile.gpu_memory_gbs * 1e9) if profile.gpu_memory_gbs else 0.0
    if host_bytes:
        seconds += host_bytes / (profile.host_ram_gbs * 1e9) if profile.host_ram_gbs else 0.0
    return 1 / seconds if seconds else 0.0

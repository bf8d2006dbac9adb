"""The rotary scheduler plugin in this process: loaded, checked and registered as a ggml device once, then
one scheduler state per model opened with a rotary placement, with the rotation that drives its slots."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rotary_gguf import environment
from rotary_gguf import plugin as rotary_plugin
from rotary_gguf.gguf import ModelIndex
from rotary_gguf.plan import ROTARY_MAX_BATCH_GPU, Placement
from rotary_gguf.profile import Profile
from rotary_gguf.rotation import LayerShape, Rotation, can_rotate
from rotary_gguf.router import RouterError, read_routers
from rotary_gguf.runtime.llama import gpu_device_name, llama_cpp
from rotary_gguf.runtime.options import EngineOptions

log = logging.getLogger(__name__)
PluginError = rotary_plugin.PluginError
_state: dict[str, Any] = {}


def rotary_device() -> str | None:
    """Where rotary expert slots can live in this process: "cpu" when ROTARY_SCHED_DEVICE=cpu (a second CPU
    backend stands in for the GPU), "gpu" with a GPU build of llama.cpp, else None."""
    if environment.sched_device_is_cpu():
        return "cpu"
    return "gpu" if gpu_device_name() else None


def scheduler_plugin(device_fallback: str | None = None) -> rotary_plugin.Plugin:
    """The scheduler plugin, loaded, checked against this llama-cpp-python and registered as a ggml device
    once per process (a failure to load is remembered: PluginError with the same reason every time).
    device_fallback ("cpu") serves callers that only count routing, where no GPU is needed."""
    device = rotary_device() or device_fallback
    if device is None:
        raise PluginError("rotary needs a GPU and this llama.cpp build has none (ROTARY_SCHED_DEVICE=cpu runs the "
                          "scheduler on a CPU stand-in device)")
    if "plugin" not in _state:
        try:
            lib = llama_cpp()
            plugin = rotary_plugin.Plugin(rotary_plugin.plugin_path(), lib.__version__)
            plugin.register(device)
            _state["plugin"] = plugin
        except PluginError as exc:
            _state["plugin"] = exc
    if isinstance(_state["plugin"], PluginError):
        raise _state["plugin"]
    return _state["plugin"]


def rotary_unavailable() -> str | None:
    """Why --placement rotary cannot run here, or None when it can."""
    try:
        scheduler_plugin()
    except PluginError as exc:
        return str(exc)
    return None


def _max_batch(options: EngineOptions) -> int:
    """Batches above this many tokens stay whole for llama.cpp (<= 0: the plugin takes every batch)."""
    if options.routing_only:
        return 0
    if options.max_batch is not None:
        return options.max_batch
    configured = environment.sched_max_batch()
    if configured is not None:
        return configured
    return ROTARY_MAX_BATCH_GPU if rotary_device() == "gpu" else 0


def open_scheduler(index: ModelIndex, placement: Placement, profile: Profile, options: EngineOptions, *,
                   popularity: dict[int, np.ndarray] | None, trace: Any = None, replay: Any = None,
                   ) -> Rotation:
    """Before the model's context is created: a scheduler state for this model (the next context takes it),
    its slots allocated and, with a calibration, seeded with the most popular experts; and the rotation
    that moves them. Close with close_scheduler()."""
    plugin = scheduler_plugin("cpu" if options.routing_only else None)
    model = plugin.open_model(index, max_batch=_max_batch(options))
    try:
        layers = {layer: LayerShape(model.n_expert(layer), index.params.n_expert_used, model.set_slots(layer, n),
                                    index.slot_bytes(layer)) for layer, n in placement.expert_slots}
        rotate = options.rotate and not options.routing_only and can_rotate(layers)
        predicting = _set_routers(index, model) if (rotate and options.prefetch) or trace is not None else False
        rotation = Rotation(model, layers, options.policy or profile.rotation_policy, pcie_gbs=profile.pcie_gbs,
                            budget_bytes=options.copy_budget, prior=popularity, rotate=rotate,
                            prefetch=options.prefetch and predicting, trace=trace, replay=replay)
        if popularity:
            rotation.seed_from_popularity(popularity)
        for layer, shape in layers.items():  # a layer whose slots hold all its experts is filled once, now
            if shape.n_slots >= shape.n_expert and not (popularity and layer in popularity):
                rotation.rotator.set_resident(layer, list(range(shape.n_expert)))
    except BaseException:
        model.close()
        raise
    return rotation


def _set_routers(index: ModelIndex, model: rotary_plugin.ModelScheduler) -> bool:
    """Give the plugin the MoE layers' routers, for cross-layer prediction; False when they cannot be read
    (the model then runs without prefetch)."""
    try:  # not the NextN (MTP) blocks: llama.cpp does not run them when decoding
        routers = read_routers(index, [layer for layer in model.layers if layer not in index.nextn_layers])
    except RouterError as exc:
        log.warning("no cross-layer prefetch: %s", exc)
        return False
    for layer, router in routers.items():
        model.set_router(layer, router)
    return bool(routers)


def routing_callback(rotation: Rotation | None) -> tuple[int, int | None] | None:
    """The eval callback (C function address, user data) the model's context must be created with so that
    the plugin counts the routing of the batches above its threshold, which it leaves to llama.cpp; None
    when there is no such batch (no rotary placement, or the plugin takes every batch)."""
    if rotation is None or rotation.plugin.max_batch <= 0:
        return None
    return rotation.plugin.eval_callback()


def close_scheduler(rotation: Rotation) -> None:
    """Free the model's scheduler state (after its context is freed)."""
    rotation.plugin.commit()
    rotation.plugin.close()

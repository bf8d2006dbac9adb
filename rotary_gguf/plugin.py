"""The rotary scheduler plugin (native/, built by `rotary plugin build`) seen from Python.

Part of the runtime layer: runtime.py registers the plugin before a context exists and configures it for
the model it loads; this module is the ctypes binding of native/rotary_sched.h (each declaration quoted
above its stub) and the per-layer statistics it reports.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex

LIBRARY_NAME = "librotary_sched.so"
ABI = 1
DEVICE_ENV = "ROTARY_SCHED_DEVICE"  # "cpu": a second CPU backend stands in for the GPU
_u64p = ctypes.POINTER(ctypes.c_uint64)
_i32p = ctypes.POINTER(ctypes.c_int32)


class PluginError(RotaryError):
    """The scheduler plugin is missing, was built for another llama-cpp-python, or refused a request."""


def plugin_path() -> Path:
    """Where the plugin is: $ROTARY_PLUGIN, else where `rotary plugin build` installs it."""
    override = os.environ.get("ROTARY_PLUGIN")
    return Path(override) if override else Path(__file__).parent / "lib" / LIBRARY_NAME


def expected_build_info(llama_cpp_version: str) -> str:
    return f"rotary-sched {ABI}; llama-cpp-python {llama_cpp_version}; ggml backend API 2"


@dataclass(frozen=True)
class ExpertTensor:
    """One stacked routed-expert weight (gate, up, down or gate_up of a layer) as the plugin needs it."""

    name: str
    file: int
    offset: int
    expert_bytes: int
    n_expert: int
    type: int
    ne0: int
    ne1: int
    layer: int


def expert_tensors(index: ModelIndex) -> tuple[ExpertTensor, ...]:
    """The stacked routed-expert weights of a model: what the plugin keeps slots for."""
    return tuple(ExpertTensor(t.name, t.file, t.offset, t.nbytes // t.shape[2], t.shape[2], int(t.type), t.shape[0],
                              t.shape[1], t.layer or 0) for t in index.stacked_expert_weights)


@dataclass(frozen=True)
class LayerStats:
    """What the plugin saw of one layer since its statistics were reset."""

    layer: int
    device_pairs: int  # (token, expert) selections computed from a VRAM slot
    host_pairs: int  # ... computed on the CPU from host memory
    counts: tuple[int, ...]  # selections per expert

    @property
    def hit_rate(self) -> float:
        total = self.device_pairs + self.host_pairs
        return self.device_pairs / total if total else 0.0


class Plugin:
    """The loaded plugin library; `register()` makes it a ggml device of the running llama.cpp."""

    def __init__(self, path: Path, llama_cpp_version: str) -> None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise PluginError(f"{path}: cannot load the scheduler plugin ({exc}); run `rotary plugin build`") from None
        for name, restype, argtypes in (
            # const char * rotary_sched_build_info(void);
            ("rotary_sched_build_info", ctypes.c_char_p, []),
            # const char * rotary_sched_last_error(void);
            ("rotary_sched_last_error", ctypes.c_char_p, []),
            # int rotary_sched_register(const char * device);
            ("rotary_sched_register", ctypes.c_int, [ctypes.c_char_p]),
            # const char * rotary_sched_device_description(void);
            ("rotary_sched_device_description", ctypes.c_char_p, []),
            # void rotary_sched_reset(void);
            ("rotary_sched_reset", None, []),
            # int rotary_sched_add_file(const char * path);
            ("rotary_sched_add_file", ctypes.c_int, [ctypes.c_char_p]),
            # int rotary_sched_add_tensor(const char * name, int file, uint64_t offset, uint64_t expert_bytes,
            #                             int n_expert, int type, int64_t ne0, int64_t ne1);
            ("rotary_sched_add_tensor", ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint64,
                                                       ctypes.c_uint64, ctypes.c_int, ctypes.c_int,
                                                       ctypes.c_int64, ctypes.c_int64]),
            # int rotary_sched_set_slots(int layer, int n_slots);
            ("rotary_sched_set_slots", ctypes.c_int, [ctypes.c_int, ctypes.c_int]),
            # int rotary_sched_set_resident(int layer, const int32_t * experts, int n_experts);
            ("rotary_sched_set_resident", ctypes.c_int, [ctypes.c_int, _i32p, ctypes.c_int]),
            # void rotary_sched_set_max_batch(int n_tokens);
            ("rotary_sched_set_max_batch", None, [ctypes.c_int]),
            # int rotary_sched_layer_stats(int layer, uint64_t * out, uint64_t * counts, int n_expert);
            ("rotary_sched_layer_stats", ctypes.c_int, [ctypes.c_int, _u64p, _u64p, ctypes.c_int]),
            # void rotary_sched_stats(uint64_t * out);
            ("rotary_sched_stats", None, [_u64p]),
            # void rotary_sched_reset_stats(void);
            ("rotary_sched_reset_stats", None, []),
        ):
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise PluginError(f"{path}: not a rotary scheduler plugin (no {name}); "
                                  "run `rotary plugin build`") from None
            fn.restype, fn.argtypes = restype, argtypes
        info = lib.rotary_sched_build_info().decode()
        if info != expected_build_info(llama_cpp_version):
            raise PluginError(f"{path}: built as '{info}', this is llama-cpp-python {llama_cpp_version}; "
                              "run `rotary plugin build` again")
        self.path, self._lib, self.build_info, self.description = path, lib, info, ""
        self._n_expert: dict[int, int] = {}

    def _check(self, result: int) -> int:
        if result < 0:
            raise PluginError(f"scheduler plugin: {self._lib.rotary_sched_last_error().decode()}")
        return result

    def register(self, device: str) -> str:
        """Register as a ggml ACCEL device with slots on "gpu" or the "cpu" stand-in; returns its description."""
        self._check(self._lib.rotary_sched_register(device.encode()))
        self.description = self._lib.rotary_sched_device_description().decode()
        return self.description

    def configure(self, index: ModelIndex, max_batch: int = 0) -> None:
        """Forget any previous model and serve this one's routed experts (no slots yet)."""
        self._lib.rotary_sched_reset()
        self._n_expert = {}
        files = [self._check(self._lib.rotary_sched_add_file(str(f).encode())) for f in index.files or (index.path,)]
        for t in expert_tensors(index):
            self._check(self._lib.rotary_sched_add_tensor(t.name.encode(), files[t.file], t.offset, t.expert_bytes,
                                                          t.n_expert, t.type, t.ne0, t.ne1))
            self._n_expert[t.layer] = t.n_expert
        self._lib.rotary_sched_set_max_batch(max_batch)

    def reset(self) -> None:
        """Serve no model: every op goes back to llama.cpp's own backends."""
        self._lib.rotary_sched_reset()
        self._n_expert = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self._n_expert))

    def n_expert(self, layer: int) -> int:
        return self._n_expert[layer]

    def set_slots(self, layer: int, n_slots: int) -> int:
        """Allocate a layer's expert slots on the device (emptied); returns how many it got."""
        return self._check(self._lib.rotary_sched_set_slots(layer, n_slots))

    def set_resident(self, layer: int, experts: list[int]) -> None:
        """Make these experts the layer's residents, in slot order (copies their blocks to the device)."""
        array = (ctypes.c_int32 * max(1, len(experts)))(*experts)
        self._check(self._lib.rotary_sched_set_resident(layer, array, len(experts)))

    def layer_stats(self, layer: int) -> LayerStats:
        n_expert = self._n_expert[layer]
        out, counts = (ctypes.c_uint64 * 2)(), (ctypes.c_uint64 * n_expert)()
        self._check(self._lib.rotary_sched_layer_stats(layer, out, counts, n_expert))
        return LayerStats(layer, out[0], out[1], tuple(counts))

    def stats(self) -> dict[str, int]:
        """Process-wide counters: graph_compute calls, split expert matmuls, device bytes held."""
        out = (ctypes.c_uint64 * 3)()
        self._lib.rotary_sched_stats(out)
        return {"graph_calls": out[0], "split_matmuls": out[1], "device_bytes": out[2]}

    def reset_stats(self) -> None:
        self._lib.rotary_sched_reset_stats()


class Residency:
    """Which experts sit in a loaded model's slots. Before the first token of a request, each layer's slots
    take the experts the request's prompt selected most (counted by the plugin while it computed the prompt);
    experts already resident win ties (so slots the prompt does not need keep what they held)."""

    def __init__(self, plugin: Plugin, slots: dict[int, int]) -> None:
        self.plugin, self.slots = plugin, {layer: n for layer, n in slots.items() if n > 0}
        self.resident: dict[int, list[int]] = {layer: [] for layer in self.slots}

    def before_prompt(self) -> None:
        self.plugin.reset_stats()

    def after_prompt(self) -> None:
        """Seed the slots from the prompt's routing, then start counting the decode afresh."""
        for layer, n_slots in self.slots.items():
            counts = self.plugin.layer_stats(layer).counts
            if not any(counts):
                continue  # the prompt went to llama.cpp's own offload: keep what is resident
            before = set(self.resident[layer])
            chosen = sorted(range(len(counts)), key=lambda e: (-counts[e], e not in before, e))[:n_slots]
            self.plugin.set_resident(layer, chosen)
            self.resident[layer] = chosen
        self.plugin.reset_stats()

    def layer_stats(self) -> list[LayerStats]:
        return [self.plugin.layer_stats(layer) for layer in self.plugin.layers]

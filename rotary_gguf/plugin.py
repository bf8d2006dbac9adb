"""The rotary scheduler plugin (native/, built by `rotary plugin build`) seen from Python.

Part of the runtime layer: the runtime registers the plugin once per process before a context exists
(`Plugin`), and opens a scheduler state for each model it loads with rotary placements (`ModelScheduler`:
that model's files, slots, workers and counters), which the next llama context created takes. This module
is the ctypes binding of native/rotary_sched.h (each declaration quoted above its stub) and the
statistics it reports.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rotary_gguf import environment
from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex
from rotary_gguf.router import Router

LIBRARY_NAME = "librotary_sched.so"
ABI = 6
_u64p = ctypes.POINTER(ctypes.c_uint64)
_i32p = ctypes.POINTER(ctypes.c_int32)
_model = ctypes.c_void_p  # rotary_sched_model *
_decide = ctypes.c_void_p  # rotary_decide *
_i64p = ctypes.POINTER(ctypes.c_int64)


class PluginError(RotaryError):
    """The scheduler plugin is missing, was built for another llama-cpp-python, or refused a request."""


class _LayerStats(ctypes.Structure):
    """typedef struct rotary_sched_layer_stats_t { uint64_t device_pairs, host_pairs, admissions, evictions,
    bytes_copied, prefetches; } rotary_sched_layer_stats_t;"""

    _fields_ = [(name, ctypes.c_uint64) for name in
                ("device_pairs", "host_pairs", "admissions", "evictions", "bytes_copied", "prefetches")]


_STATS_FIELDS = ("graph_calls", "split_matmuls", "device_bytes", "stall_ns", "commits", "stalls", "device_syncs",
                 "transfers", "transfer_bytes", "off_thread_calls", "host_allocs", "copy_chunks", "copy_bytes",
                 "copy_ns", "resident_bytes", "prompt_selections", "staging_bytes", "prefetch_stall_ns")


class _Stats(ctypes.Structure):
    """typedef struct rotary_sched_stats_t { uint64_t graph_calls, split_matmuls, device_bytes, stall_ns,
    commits, stalls, device_syncs, transfers, transfer_bytes, off_thread_calls, host_allocs, copy_chunks,
    copy_bytes, copy_ns, resident_bytes, prompt_selections, staging_bytes, prefetch_stall_ns; }
    rotary_sched_stats_t;"""

    _fields_ = [(name, ctypes.c_uint64) for name in _STATS_FIELDS]


class _DecideLayer(ctypes.Structure):
    """typedef struct rotary_decide_layer_t { int32_t layer, n_expert, n_used, n_slots; uint64_t slot_bytes; }
    rotary_decide_layer_t;"""

    _fields_ = [("layer", ctypes.c_int32), ("n_expert", ctypes.c_int32), ("n_used", ctypes.c_int32),
                ("n_slots", ctypes.c_int32), ("slot_bytes", ctypes.c_uint64)]


class _DecidePolicy(ctypes.Structure):
    """typedef struct rotary_decide_policy_t { int32_t kind; double decay, request_weight, calibration_weight,
    admit_margin; } rotary_decide_policy_t;"""

    _fields_ = [("kind", ctypes.c_int32), ("decay", ctypes.c_double), ("request_weight", ctypes.c_double),
                ("calibration_weight", ctypes.c_double), ("admit_margin", ctypes.c_double)]


class _Router(ctypes.Structure):
    """typedef struct rotary_sched_router_t { int64_t n_embd; int32_t n_expert, n_used, gating;
    const float * weight, * logit_bias, * select_bias, * input_scale; } rotary_sched_router_t;"""

    _fields_ = [("n_embd", ctypes.c_int64), ("n_expert", ctypes.c_int32), ("n_used", ctypes.c_int32),
                ("gating", ctypes.c_int32)] + [(name, ctypes.c_void_p) for name in
                                               ("weight", "logit_bias", "select_bias", "input_scale")]


class _DecidePrefetch(ctypes.Structure):
    """typedef struct rotary_decide_prefetch_t { double min_recall, recall_decay; } rotary_decide_prefetch_t;"""

    _fields_ = [("min_recall", ctypes.c_double), ("recall_decay", ctypes.c_double)]


# typedef struct rotary_decide_counters_t { uint64_t hits, misses, admissions, evictions, bytes_copied,
#     prefetches, prefetch_hits, predicted, predicted_right; } rotary_decide_counters_t;
DECISION_COUNTERS = ("hits", "misses", "admissions", "evictions", "bytes_copied", "prefetches", "prefetch_hits",
                     "predicted", "predicted_right")
GATINGS = {"softmax": 0, "sigmoid": 1, "softmax_weight": 2, "sqrt_softplus": 3}  # ROTARY_GATING_*
# typedef struct rotary_decide_copy_t { int32_t layer, expert, slot, victim; } rotary_decide_copy_t;
_COPY = np.dtype([("layer", np.int32), ("expert", np.int32), ("slot", np.int32), ("victim", np.int32)])
DECIDE_KINDS = {"recency": 0, "frequency": 1}  # ROTARY_DECIDE_RECENCY, ROTARY_DECIDE_FREQUENCY


def _int32s(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int32 * max(1, len(values)))(*values)


def plugin_path() -> Path:
    """Where the plugin is: $ROTARY_PLUGIN, else where `rotary plugin build` installs it."""
    return environment.plugin_override() or Path(__file__).parent / "lib" / LIBRARY_NAME


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
    admissions: int  # experts copied into a slot by rotation
    evictions: int  # ... that replaced a resident expert
    bytes_copied: int  # by rotation and prefetch
    counts: tuple[int, ...]  # selections per expert
    prefetches: int = 0  # experts copied ahead of their layer on a prediction

    @property
    def hit_rate(self) -> float:
        total = self.device_pairs + self.host_pairs
        return self.device_pairs / total if total else 0.0


@dataclass(frozen=True)
class SchedulerStats:
    """One model's scheduler counters since they were reset (device_bytes: held now)."""

    graph_calls: int  # graph_compute calls of the contexts holding the state
    split_matmuls: int  # expert matmuls (or whole expert FFNs) split between device and host
    device_bytes: int  # slots, scratch and staging held on the device
    stall_ns: int  # nanoseconds commits waited for copies (copy stalls)
    commits: int  # commits that had copies to wait for
    stalls: int = 0  # ... whose copies had not all reached staging yet
    device_syncs: int = 0  # blocking waits on a device stream (workers and copier)
    transfers: int = 0  # host <-> device copies issued (activations, ids, outputs, slot chunks)
    transfer_bytes: int = 0
    off_thread_calls: int = 0  # device calls made on the copier's thread (0 by design)
    host_allocs: int = 0  # staging allocations (pinned on a GPU), ever
    copy_chunks: int = 0  # chunks (<= 256 KiB) the copier moved from the file to staging
    copy_bytes: int = 0
    copy_ns: int = 0  # time the copier's thread spent on them
    resident_bytes: int = 0  # copied by set_resident
    prompt_selections: int = 0  # counted by the eval callback (batches the plugin did not claim)
    staging_bytes: int = 0  # host staging held (pinned on a GPU)
    prefetch_stall_ns: int = 0  # nanoseconds layers waited for their prefetched experts

    @property
    def copy_gbs(self) -> float | None:
        """The copier's measured rate (file mapping -> staging), GB/s; None before it copied anything."""
        return self.copy_bytes / self.copy_ns if self.copy_ns else None


_DECLARATIONS = (
    # const char * rotary_sched_build_info(void);
    ("rotary_sched_build_info", ctypes.c_char_p, []),
    # const char * rotary_sched_last_error(void);
    ("rotary_sched_last_error", ctypes.c_char_p, []),
    # int rotary_sched_register(const char * device);
    ("rotary_sched_register", ctypes.c_int, [ctypes.c_char_p]),
    # const char * rotary_sched_device_description(void);
    ("rotary_sched_device_description", ctypes.c_char_p, []),
    # rotary_sched_model * rotary_sched_model_new(void);
    ("rotary_sched_model_new", _model, []),
    # void rotary_sched_model_free(rotary_sched_model * model);
    ("rotary_sched_model_free", None, [_model]),
    # void rotary_sched_attach(rotary_sched_model * model);
    ("rotary_sched_attach", None, [_model]),
    # int rotary_sched_model_contexts(const rotary_sched_model * model);
    ("rotary_sched_model_contexts", ctypes.c_int, [_model]),
    # int rotary_sched_add_file(rotary_sched_model * model, const char * path);
    ("rotary_sched_add_file", ctypes.c_int, [_model, ctypes.c_char_p]),
    # int rotary_sched_add_tensor(rotary_sched_model * model, const char * name, int file, uint64_t offset,
    #                             uint64_t expert_bytes, int n_expert, int type, int64_t ne0, int64_t ne1);
    ("rotary_sched_add_tensor", ctypes.c_int, [_model, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint64,
                                               ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                               ctypes.c_int64]),
    # int rotary_sched_set_slots(rotary_sched_model * model, int layer, int n_slots);
    ("rotary_sched_set_slots", ctypes.c_int, [_model, ctypes.c_int, ctypes.c_int]),
    # int rotary_sched_set_resident(rotary_sched_model * model, int layer, const int32_t * experts, int n_experts);
    ("rotary_sched_set_resident", ctypes.c_int, [_model, ctypes.c_int, _i32p, ctypes.c_int]),
    # void rotary_sched_set_max_batch(rotary_sched_model * model, int n_tokens);
    ("rotary_sched_set_max_batch", None, [_model, ctypes.c_int]),
    # int rotary_sched_admit(rotary_sched_model * model, int layer, const int32_t * experts,
    #                        const int32_t * slots, int n);
    ("rotary_sched_admit", ctypes.c_int, [_model, ctypes.c_int, _i32p, _i32p, ctypes.c_int]),
    # void rotary_sched_commit(rotary_sched_model * model);
    ("rotary_sched_commit", None, [_model]),
    # int rotary_sched_prefetch(rotary_sched_model * model, int layer, const int32_t * experts,
    #                           const int32_t * slots, int n);
    ("rotary_sched_prefetch", ctypes.c_int, [_model, ctypes.c_int, _i32p, _i32p, ctypes.c_int]),
    # int rotary_sched_set_router(rotary_sched_model * model, int layer, const rotary_sched_router_t * router);
    ("rotary_sched_set_router", ctypes.c_int, [_model, ctypes.c_int, ctypes.POINTER(_Router)]),
    # int rotary_sched_predict(rotary_sched_model * model, int layer, const float * x, int32_t * out);
    ("rotary_sched_predict", ctypes.c_int, [_model, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    # int64_t rotary_sched_take_predictions(rotary_sched_model * model, int layer, int32_t * out,
    #                                       int64_t capacity);
    ("rotary_sched_take_predictions", ctypes.c_int64, [_model, ctypes.c_int, _i32p, ctypes.c_int64]),
    # void rotary_sched_set_recording(rotary_sched_model * model, int on);
    ("rotary_sched_set_recording", None, [_model, ctypes.c_int]),
    # int64_t rotary_sched_take_routing(rotary_sched_model * model, int layer, int32_t * out, int64_t capacity);
    ("rotary_sched_take_routing", ctypes.c_int64, [_model, ctypes.c_int, _i32p, ctypes.c_int64]),
    # int rotary_sched_set_replay(rotary_sched_model * model, int layer, const int32_t * ids, int64_t n);
    ("rotary_sched_set_replay", ctypes.c_int, [_model, ctypes.c_int, _i32p, ctypes.c_int64]),
    # int rotary_sched_layer_stats(rotary_sched_model * model, int layer, rotary_sched_layer_stats_t * out,
    #                              uint64_t * counts, int n_expert);
    ("rotary_sched_layer_stats", ctypes.c_int, [_model, ctypes.c_int, ctypes.POINTER(_LayerStats), _u64p,
                                                ctypes.c_int]),
    # int64_t rotary_sched_read_slot(rotary_sched_model * model, int layer, int slot, uint8_t * out,
    #                                int64_t capacity);
    ("rotary_sched_read_slot", ctypes.c_int64, [_model, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                                ctypes.c_int64]),
    # bool rotary_sched_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);
    ("rotary_sched_eval_callback", ctypes.c_bool, [ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p]),
    # void * rotary_sched_eval_data(rotary_sched_model * model);
    ("rotary_sched_eval_data", ctypes.c_void_p, [_model]),
    # const char * rotary_sched_boundary_buffer_type(rotary_sched_model * model);
    ("rotary_sched_boundary_buffer_type", ctypes.c_char_p, [_model]),
    # void rotary_sched_stats(rotary_sched_model * model, rotary_sched_stats_t * out);
    ("rotary_sched_stats", None, [_model, ctypes.POINTER(_Stats)]),
    # void rotary_sched_reset_stats(rotary_sched_model * model);
    ("rotary_sched_reset_stats", None, [_model]),
    # rotary_decide * rotary_decide_new(const rotary_decide_layer_t * layers, int n_layers,
    #                                   const rotary_decide_policy_t * policy);
    ("rotary_decide_new", _decide, [ctypes.POINTER(_DecideLayer), ctypes.c_int, ctypes.POINTER(_DecidePolicy)]),
    # void rotary_decide_free(rotary_decide * d);
    ("rotary_decide_free", None, [_decide]),
    # int rotary_decide_set_prior(rotary_decide * d, int layer, const double * popularity, int n_expert);
    ("rotary_decide_set_prior", ctypes.c_int, [_decide, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]),
    # void rotary_decide_bind(rotary_decide * d, rotary_sched_model * model);
    ("rotary_decide_bind", None, [_decide, _model]),
    # int rotary_decide_after_prompt(rotary_decide * d, const int32_t * ids, const int64_t * counts);
    ("rotary_decide_after_prompt", ctypes.c_int, [_decide, ctypes.c_void_p, ctypes.c_void_p]),
    # int rotary_decide_after_token(rotary_decide * d, const int32_t * ids, const int64_t * counts,
    #                               int64_t budget);
    ("rotary_decide_after_token", ctypes.c_int, [_decide, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]),
    # int rotary_decide_after_recorded_token(rotary_decide * d, int64_t budget);
    ("rotary_decide_after_recorded_token", ctypes.c_int, [_decide, ctypes.c_int64]),
    # int rotary_decide_set_resident(rotary_decide * d, int layer, const int32_t * experts, int n);
    ("rotary_decide_set_resident", ctypes.c_int, [_decide, ctypes.c_int, _i32p, ctypes.c_int]),
    # int rotary_decide_commit(rotary_decide * d);
    ("rotary_decide_commit", ctypes.c_int, [_decide]),
    # int rotary_decide_set_prefetch(rotary_decide * d, const rotary_decide_prefetch_t * prefetch);
    ("rotary_decide_set_prefetch", ctypes.c_int, [_decide, ctypes.POINTER(_DecidePrefetch)]),
    # void rotary_decide_set_budget(rotary_decide * d, int64_t budget);
    ("rotary_decide_set_budget", None, [_decide, ctypes.c_int64]),
    # void rotary_decide_before_prompt(rotary_decide * d);
    ("rotary_decide_before_prompt", None, [_decide]),
    # int rotary_decide_prefetch(rotary_decide * d, int layer, const int32_t * predicted, int n);
    ("rotary_decide_prefetch", ctypes.c_int, [_decide, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]),
    # double rotary_decide_recall(const rotary_decide * d, int layer);
    ("rotary_decide_recall", ctypes.c_double, [_decide, ctypes.c_int]),
    # void rotary_decide_shape(const rotary_decide * d, int * rows, int * n_expert_max, int * n_slots_max);
    ("rotary_decide_shape", None, [_decide] + [ctypes.POINTER(ctypes.c_int)] * 3),
    # int32_t * rotary_decide_slot_of(rotary_decide * d);
    ("rotary_decide_slot_of", ctypes.c_void_p, [_decide]),
    # int32_t * rotary_decide_expert_in(rotary_decide * d);
    ("rotary_decide_expert_in", ctypes.c_void_p, [_decide]),
    # uint8_t * rotary_decide_busy(rotary_decide * d);
    ("rotary_decide_busy", ctypes.c_void_p, [_decide]),
    # rotary_decide_counters_t * rotary_decide_counters(rotary_decide * d);
    ("rotary_decide_counters", ctypes.c_void_p, [_decide]),
    # void rotary_decide_reset_counters(rotary_decide * d);
    ("rotary_decide_reset_counters", None, [_decide]),
    # int64_t rotary_decide_step(const rotary_decide * d);
    ("rotary_decide_step", ctypes.c_int64, [_decide]),
    # void rotary_decide_set_step(rotary_decide * d, int64_t step);
    ("rotary_decide_set_step", None, [_decide, ctypes.c_int64]),
    # int rotary_decide_pending(const rotary_decide * d, rotary_decide_copy_t * out, int capacity);
    ("rotary_decide_pending", ctypes.c_int, [_decide, ctypes.c_void_p, ctypes.c_int]),
    # int64_t rotary_decide_copied(const rotary_decide * d, uint64_t * out, int64_t capacity);
    ("rotary_decide_copied", ctypes.c_int64, [_decide, ctypes.c_void_p, ctypes.c_int64]),
    # int rotary_decide_values(rotary_decide * d, double * out, int64_t capacity);
    ("rotary_decide_values", ctypes.c_int, [_decide, ctypes.c_void_p, ctypes.c_int64]),
)


def _load(path: Path, llama_cpp_version: str) -> ctypes.CDLL:
    """The plugin library at path, its functions declared, checked against this llama-cpp-python."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise PluginError(f"{path}: cannot load the scheduler plugin ({exc}); run `rotary plugin build`") from None
    for name, restype, argtypes in _DECLARATIONS:
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
    return lib


_decision_library: dict[Path, ctypes.CDLL] = {}


def decision_library() -> ctypes.CDLL:
    """The plugin library for its decision engine alone (the simulator): loaded with the ggml libraries it
    links (by soname when llama.cpp already loaded them, else from llama_cpp/lib), no llama.cpp model or
    libllama needed."""
    path = plugin_path()
    if path not in _decision_library:
        try:
            version = importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            raise PluginError("llama-cpp-python is not installed; run scripts/setup_env.sh") from None
        spec = importlib.util.find_spec("llama_cpp")
        package = Path(spec.submodule_search_locations[0]) / "lib" if spec and spec.submodule_search_locations else None
        folder = environment.library_override() or package
        for name in ("libggml-base.so.0", "libggml.so.0"):
            try:
                ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
            except OSError:
                try:
                    ctypes.CDLL(str(folder / name) if folder else name, mode=ctypes.RTLD_GLOBAL)
                except OSError as exc:
                    raise PluginError(f"{folder}: cannot load {name} for the scheduler plugin: {exc}") from None
        _decision_library[path] = _load(path, version)
    return _decision_library[path]


class _Memory:
    """Native memory seen by numpy: the arrays made from it keep `owner` (which frees the memory) alive."""

    def __init__(self, owner: object, address: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.owner = owner
        self.__array_interface__ = {"data": (address, False), "shape": shape, "typestr": dtype.str,
                                    "descr": dtype.descr, "version": 3}


def _native_array(owner: object, address: int | None, shape: tuple[int, ...], dtype: object) -> np.ndarray:
    dtype = np.dtype(dtype)
    if not address or 0 in shape:
        return np.zeros(shape, dtype)
    return np.asarray(_Memory(owner, address, shape, dtype))


class Decisions:
    """A native decision object (rotary_decide in native/rotary_sched.h): slot tables, counters and the
    rotation policy of a set of MoE layers, one call per token. `slot_of`, `expert_in`, `busy` and
    `counters` are numpy views of its own tables ([rows, ...], rows in ascending layer order)."""

    def __init__(self, shapes: list[tuple[int, int, int, int, int]], kind: str, decay: float,
                 request_weight: float, calibration_weight: float, admit_margin: float = 0.0,
                 model: ModelScheduler | None = None) -> None:
        """shapes: (layer, n_expert, n_used, n_slots, slot_bytes) per layer; kind: "recency" or "frequency";
        model: the scheduler state the decisions go to (bound), else none (the simulator)."""
        if kind not in DECIDE_KINDS:
            raise PluginError(f"unknown decision policy kind {kind!r}; known: {', '.join(DECIDE_KINDS)}")
        self._lib = lib = model._plugin._lib if model is not None else decision_library()
        layers = (_DecideLayer * max(1, len(shapes)))(*[_DecideLayer(*shape) for shape in shapes])
        policy = _DecidePolicy(DECIDE_KINDS[kind], decay, request_weight, calibration_weight, admit_margin)
        self._handle = lib.rotary_decide_new(layers, len(shapes), ctypes.byref(policy))
        if not self._handle:
            raise PluginError(f"scheduler plugin: {lib.rotary_sched_last_error().decode()}")
        self.layers = sorted(shape[0] for shape in shapes)
        rows, width, depth = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        lib.rotary_decide_shape(self._handle, ctypes.byref(rows), ctypes.byref(width), ctypes.byref(depth))
        shape, deep = (rows.value, width.value), (rows.value, depth.value)
        self.slot_of = _native_array(self, lib.rotary_decide_slot_of(self._handle), shape, np.int32)
        self.expert_in = _native_array(self, lib.rotary_decide_expert_in(self._handle), deep, np.int32)
        self.busy = _native_array(self, lib.rotary_decide_busy(self._handle), deep, np.bool_)
        self.counters = _native_array(self, lib.rotary_decide_counters(self._handle),
                                      (rows.value, len(DECISION_COUNTERS)), np.uint64)
        self._bound: ModelScheduler | None = None
        if model is not None:
            self.bind(model)

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.rotary_decide_free(self._handle)
            self._handle = None

    def _check(self, result: int) -> int:
        if result < 0:
            raise PluginError(f"scheduler plugin: {self._lib.rotary_sched_last_error().decode()}")
        return result

    def bind(self, model: ModelScheduler | None) -> None:
        """Commits, admissions and residency also go to this model's scheduler state (None: to nothing).
        The binding holds the state; closing the model unbinds, so the state goes with its handle."""
        if self._bound is not None:
            self._bound._decisions.discard(self)
        if model is not None:
            model._call("model_contexts")  # refuses a closed model
            model._decisions.add(self)
        self._lib.rotary_decide_bind(self._handle, model._handle if model is not None else None)
        self._bound = model

    def set_prior(self, layer: int, popularity: np.ndarray) -> None:
        values = np.ascontiguousarray(popularity, dtype=np.float64)
        self._check(self._lib.rotary_decide_set_prior(self._handle, layer, values.ctypes.data, len(values)))

    def after_prompt(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """ids: every row's ids concatenated (int32); counts: per row (int64, -1: layer absent)."""
        self._check(self._lib.rotary_decide_after_prompt(self._handle, ids.ctypes.data, counts.ctypes.data))

    def after_token(self, ids: np.ndarray, counts: np.ndarray, budget: int | None) -> int:
        """As after_prompt's arguments; returns how many copies it started. budget None: no limit."""
        return self._check(self._lib.rotary_decide_after_token(self._handle, ids.ctypes.data, counts.ctypes.data,
                                                               -1 if budget is None else max(0, budget)))

    def after_recorded_token(self, budget: int | None) -> int:
        """Bound only: after_token on the routing the model recorded since the last take."""
        return self._check(self._lib.rotary_decide_after_recorded_token(self._handle,
                                                                        -1 if budget is None else max(0, budget)))

    def set_resident(self, layer: int, experts: list[int]) -> None:
        self._check(self._lib.rotary_decide_set_resident(self._handle, layer, _int32s(experts), len(experts)))

    def set_prefetch(self, min_recall: float | None, recall_decay: float = 0.0) -> None:
        """Cross-layer prefetch on (None: off), switched off per layer while its recall is below min_recall."""
        params = None if min_recall is None else ctypes.byref(_DecidePrefetch(min_recall, recall_decay))
        self._check(self._lib.rotary_decide_set_prefetch(self._handle, params))

    def before_prompt(self) -> None:
        self._lib.rotary_decide_before_prompt(self._handle)

    def set_budget(self, budget: int | None) -> None:
        """The budget prefetches use until the next after_token brings its own (None: no limit)."""
        self._lib.rotary_decide_set_budget(self._handle, -1 if budget is None else max(0, budget))

    def prefetch(self, layer: int, predicted: np.ndarray) -> int:
        """A prediction of the layer's experts for the token being decoded; returns the copies started."""
        ids = np.ascontiguousarray(predicted, dtype=np.int32)
        return self._check(self._lib.rotary_decide_prefetch(self._handle, layer, ids.ctypes.data, len(ids)))

    def recall(self, layer: int) -> float:
        return self._lib.rotary_decide_recall(self._handle, layer)

    def commit(self) -> None:
        self._check(self._lib.rotary_decide_commit(self._handle))

    def reset_counters(self) -> None:
        self._lib.rotary_decide_reset_counters(self._handle)

    @property
    def step(self) -> int:
        return self._lib.rotary_decide_step(self._handle)

    @step.setter
    def step(self, value: int) -> None:
        self._lib.rotary_decide_set_step(self._handle, value)

    def pending(self) -> list[tuple[int, int, int, int]]:
        """(layer, expert, slot, victim) of the copies started by the last after_token, not yet committed."""
        out = np.zeros(self._lib.rotary_decide_pending(self._handle, None, 0), _COPY)
        self._lib.rotary_decide_pending(self._handle, out.ctypes.data, len(out))
        return [tuple(int(v) for v in row) for row in out.tolist()]

    def copied(self) -> np.ndarray:
        """Bytes copied after each decoded token, ever."""
        out = np.zeros(self._lib.rotary_decide_copied(self._handle, None, 0), np.uint64)
        self._lib.rotary_decide_copied(self._handle, out.ctypes.data, len(out))
        return out.astype(np.int64)

    def values(self) -> np.ndarray:
        """Every expert's value under the policy now, [rows, n_expert_max]."""
        out = np.zeros(self.slot_of.shape, np.float64)
        self._check(self._lib.rotary_decide_values(self._handle, out.ctypes.data, out.size))
        return out


class Plugin:
    """The loaded plugin library; `register()` makes it a ggml device of the running llama.cpp (once per
    process), `open_model()` gives each rotary model its own scheduler state."""

    def __init__(self, path: Path, llama_cpp_version: str) -> None:
        lib = _load(path, llama_cpp_version)
        self.path, self._lib, self.build_info, self.description = path, lib, lib.rotary_sched_build_info().decode(), ""

    def _error(self) -> PluginError:
        return PluginError(f"scheduler plugin: {self._lib.rotary_sched_last_error().decode()}")

    def _check(self, result: int) -> int:
        if result < 0:
            raise self._error()
        return result

    def register(self, device: str) -> str:
        """Register as a ggml ACCEL device with slots on "gpu" or the "cpu" stand-in; returns its description."""
        self._check(self._lib.rotary_sched_register(device.encode()))
        self.description = self._lib.rotary_sched_device_description().decode()
        return self.description

    def open_model(self, index: ModelIndex, max_batch: int = 0) -> ModelScheduler:
        """A scheduler state for one model, configured with its files and routed-expert tensors; the next
        llama context created in this process takes it.

        Open it right before the model's own context is created: a context created in between (llama.cpp's
        dry run) would take it instead. Prompt batches of more than max_batch tokens (> 0) are left to
        llama.cpp."""
        handle = self._lib.rotary_sched_model_new()
        if not handle:
            raise self._error()
        model = ModelScheduler(self, handle)
        try:
            files = [model._call("add_file", str(f).encode()) for f in index.files or (index.path,)]
            for t in expert_tensors(index):
                model._call("add_tensor", t.name.encode(), files[t.file], t.offset, t.expert_bytes, t.n_expert,
                            t.type, t.ne0, t.ne1)
                model._n_expert[t.layer] = t.n_expert
            model._call("set_max_batch", max_batch)
            model.max_batch = max_batch
            model._call("attach")
        except BaseException:
            model.close()
            raise
        return model


class ModelScheduler:
    """One model's scheduler state (a native handle): its slots, residents, routing record and counters.
    A context manager; close() drops the handle (a context that took the state keeps it until it is freed)."""

    def __init__(self, plugin: Plugin, handle: int) -> None:
        self._plugin, self._handle = plugin, handle
        self._n_expert: dict[int, int] = {}
        self._decisions: weakref.WeakSet[Decisions] = weakref.WeakSet()  # bound to this state
        self.routers: dict[int, Router] = {}  # set for cross-layer prediction
        self.max_batch = 0  # prompt batches of more tokens are left to llama.cpp (<= 0: none are)

    def __enter__(self) -> ModelScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, *args: object) -> int:
        if self._handle is None:
            raise PluginError(f"scheduler plugin: rotary_sched_{name} on a closed model state")
        result = getattr(self._plugin._lib, f"rotary_sched_{name}")(self._handle, *args)
        return self._plugin._check(result) if isinstance(result, int) else result

    def close(self) -> None:
        """Free the handle (and its mark as the state the next context takes, if no context took it yet)."""
        if self._handle is not None:
            for decisions in list(self._decisions):
                decisions.bind(None)
            self._plugin._lib.rotary_sched_model_free(self._handle)
            self._handle = None

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def description(self) -> str:
        """Where the slots live (the registered plugin's description)."""
        return self._plugin.description

    @property
    def contexts(self) -> int:
        """How many llama contexts hold this state (1 once the model's context is created)."""
        return self._call("model_contexts")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self._n_expert))

    def n_expert(self, layer: int) -> int:
        return self._n_expert[layer]

    def set_slots(self, layer: int, n_slots: int) -> int:
        """Allocate a layer's expert slots on the device (emptied); returns how many it got."""
        return self._call("set_slots", layer, n_slots)

    def set_resident(self, layer: int, experts: list[int]) -> None:
        """Make these experts the layer's residents, in slot order (copies their blocks to the device)."""
        self._call("set_resident", layer, _int32s(experts), len(experts))

    def admit(self, layer: int, experts: list[int], slots: list[int]) -> None:
        """Start copying experts into slots (their previous experts leave the slot table now)."""
        if experts:
            self._call("admit", layer, _int32s(experts), _int32s(slots), len(experts))

    def commit(self) -> None:
        """Wait for running copies and put their experts in the slot tables."""
        self._call("commit")

    def set_recording(self, on: bool, predictions: bool = False) -> None:
        """Keep every step's routing until taken; predictions: the plugin's predictions too."""
        self._call("set_recording", int(on) | (2 if on and predictions else 0))  # ROTARY_RECORD_PREDICTIONS

    def take_routing(self, layer: int) -> np.ndarray:
        """The expert ids the layer saw since the last take (token-major), while recording."""
        n = self._call("take_routing", layer, None, 0)
        out = np.empty(n, dtype=np.int32)
        self._call("take_routing", layer, out.ctypes.data_as(_i32p), n)
        return out

    def take_predictions(self, layer: int) -> np.ndarray:
        """The plugin's predictions of the layer's experts since the last take (n_used per predicted token)."""
        n = self._call("take_predictions", layer, None, 0)
        out = np.empty(n, dtype=np.int32)
        self._call("take_predictions", layer, out.ctypes.data_as(_i32p), n)
        return out

    def set_router(self, layer: int, router: Router) -> None:
        """The layer's router, for the plugin to predict the layer's experts one MoE layer ahead."""
        arrays = [np.ascontiguousarray(a, dtype=np.float32) if a is not None else None
                  for a in (router.weight, router.logit_bias, router.select_bias, router.input_scale)]
        pointers = [a.ctypes.data if a is not None else None for a in arrays]
        n_expert, n_embd = arrays[0].shape
        native = _Router(n_embd, n_expert, router.n_used, GATINGS[router.gating], *pointers)
        self._call("set_router", layer, ctypes.byref(native))
        self.routers[layer] = router

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The layer's router applied to x natively (the plugin's own prediction, for tests)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros(self.routers[layer].n_used, np.int32)
        self._call("predict", layer, x.ctypes.data, out.ctypes.data)
        return out

    def set_replay(self, layer: int, ids: np.ndarray) -> None:
        """Bench only: the layer computes these ids (cycled) instead of the router's."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        self._call("set_replay", layer, ids.ctypes.data_as(_i32p), len(ids))

    def layer_stats(self, layer: int) -> LayerStats:
        n_expert = self._n_expert[layer]
        out, counts = _LayerStats(), (ctypes.c_uint64 * n_expert)()
        self._call("layer_stats", layer, ctypes.byref(out), counts, n_expert)
        return LayerStats(layer, out.device_pairs, out.host_pairs, out.admissions, out.evictions, out.bytes_copied,
                          tuple(counts), out.prefetches)

    def stats(self) -> SchedulerStats:
        """The model's counters: graph_compute calls, split expert matmuls, device bytes held, nanoseconds
        commits waited for copies (copy stalls) and commits that had copies pending."""
        out = _Stats()
        self._call("stats", ctypes.byref(out))
        return SchedulerStats(*(getattr(out, name) for name in _STATS_FIELDS))

    def read_slot(self, layer: int, slot: int, nbytes: int) -> bytes:
        """Tests: the bytes one slot holds (every expert tensor of the layer, in order)."""
        out = ctypes.create_string_buffer(nbytes)
        n = self._call("read_slot", layer, slot, out, nbytes)
        return out.raw[:n]

    def eval_callback(self) -> tuple[int, int | None]:
        """(address of the C eval callback that counts prompt routing for batches the plugin does not
        claim, its user data): for llama_context_params.cb_eval / cb_eval_user_data."""
        fn = ctypes.cast(self._plugin._lib.rotary_sched_eval_callback, ctypes.c_void_p).value
        return fn, self._call("eval_data")

    @property
    def boundary_buffer_type(self) -> str:
        """The buffer type the model's context gave its split boundaries ("" before a context exists):
        the GPU's pinned host type on a GPU, "CPU" on the stand-in."""
        return self._call("boundary_buffer_type").decode()

    def reset_stats(self) -> None:
        self._call("reset_stats")

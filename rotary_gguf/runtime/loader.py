"""Loading a GGUF into llama.cpp with a placement applied as `llama_model_params.tensor_buft_overrides`
(ARCHITECTURE.md section 3), llama.cpp's own dry run, and its quantizer."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rotary_gguf.errors import RotaryError, RuntimeLoadError
from rotary_gguf.plan import Placement
from rotary_gguf.runtime.llama import (
    KV_TYPES,
    Buffer,
    captured_log,
    cpu_buffer_type,
    default_threads,
    gpu_buffer_type,
    last_line,
    llama_cpp,
    parse_buffers,
    rss_bytes,
)
from rotary_gguf.runtime.options import EngineOptions
from rotary_gguf.runtime.rpc import ModelDevices, model_devices, remote_buffer_types


class _Override(ctypes.Structure):
    # struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; };
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _override_array(placement: Placement) -> ctypes.Array | None:
    """The NULL-terminated llama_model_tensor_buft_override array of a placement (None: no overrides)."""
    if not placement.overrides:
        return None
    cpu = cpu_buffer_type()
    buffers = {"CPU": cpu, "GPU": gpu_buffer_type() or cpu, **remote_buffer_types(placement)}
    entries = [(o.pattern.encode(), buffers[o.buffer]) for o in placement.overrides]
    return (_Override * (len(entries) + 1))(*entries, (None, None))


@contextlib.contextmanager
def _llama_construction(overrides: ctypes.Array | None, repack: bool,
                        eval_callback: tuple[int, int | None] | None,
                        devices: ctypes.Array | None = None) -> Iterator[None]:
    """While Llama() runs: llama-cpp-python never sets tensor_buft_overrides or devices (its fields are
    'unused'), so hand it default params that already carry ours (and the context params the plugin's
    routing callback, when given); and defer its chat-template compilation."""
    module = llama_cpp().llama_cpp
    original = module.llama_model_default_params

    def default_params() -> Any:
        params = original()
        if devices is not None:
            params.devices = ctypes.cast(devices, ctypes.c_void_p)
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
            # Overrides to the CPU buffer type still pick the CPU's repacking buffer types (llama.cpp
            # src/llama-model-loader.cpp, "check overrides"), which copy the experts out of the mmap.
            params.use_extra_bufts = repack
        return params

    formatters = llama_cpp().llama_chat_format
    eager = formatters.Jinja2ChatFormatter

    class LazyFormatter:
        """Llama() compiles every chat template in the file at load, so a broken template would stop the
        model from loading at all; compile on first use instead (rotary renders templates itself)."""

        def __init__(self, **kwargs: Any) -> None:
            self._kwargs = kwargs

        def to_chat_handler(self) -> Any:
            return lambda *args, **kw: eager(**self._kwargs).to_chat_handler()(*args, **kw)

    original_context = module.llama_context_default_params
    callback = None
    if eval_callback is not None:
        address, data = eval_callback
        callback = module.ggml_backend_sched_eval_callback(address), ctypes.c_void_p(data)

    def context_params() -> Any:
        # Llama() builds its own context params: the rotary plugin's routing callback rides in on them.
        params = original_context()
        if callback is not None and not params.cb_eval:
            params.cb_eval, params.cb_eval_user_data = callback
        return params

    module.llama_model_default_params = default_params
    module.llama_context_default_params = context_params
    formatters.Jinja2ChatFormatter = LazyFormatter
    try:
        yield
    finally:
        module.llama_model_default_params = original
        module.llama_context_default_params = original_context
        formatters.Jinja2ChatFormatter = eager


@dataclass
class LoadedLlama:
    """A llama_cpp.Llama with llama.cpp's accounting of its load."""

    llm: Any
    buffers: tuple[Buffer, ...]
    load_seconds: float
    rss_before_load: int
    log_lines: tuple[str, ...] = field(default=(), repr=False)
    _keepalive: Any = field(default=None, repr=False)  # the arrays llama.cpp points into


def load_llama(path: Path, placement: Placement | None, options: EngineOptions,
               eval_callback: tuple[int, int | None] | None = None) -> LoadedLlama:
    """Load a GGUF with the placement's overrides and GPU layers (None: llama.cpp's defaults, CPU) and make
    a context; `options` must be filled from the profile (EngineOptions.for_profile). `eval_callback` is
    the scheduler plugin's routing callback for the context (runtime.scheduler.routing_callback)."""
    overrides = _override_array(placement) if placement else None
    devices = model_devices(placement) if placement else ModelDevices(None, 0, None)
    threads = options.threads or default_threads()
    kv = KV_TYPES[options.kv_cache_type or "f16"]
    rss = rss_bytes()
    started = time.perf_counter()
    with captured_log() as lines, _llama_construction(overrides, options.repack, eval_callback, devices.devices):
        try:
            llm = llama_cpp().Llama(
                model_path=str(path), n_ctx=placement.ctx if placement else (options.ctx or 512),
                n_threads=threads, n_threads_batch=threads, n_batch=options.batch or 512,
                n_ubatch=options.ubatch or 512, flash_attn=bool(options.flash_attention), type_k=kv, type_v=kv,
                n_gpu_layers=devices.n_gpu_layers, tensor_split=devices.tensor_split, seed=options.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            reason = last_line(lines) if lines else str(exc)
            raise RuntimeLoadError(f"{path}: llama.cpp could not load the model: {reason}") from None
    return LoadedLlama(llm, parse_buffers(lines), time.perf_counter() - started, rss, tuple(lines),
                       (overrides, devices))


def dry_run(path: str | os.PathLike[str], placement: Placement, options: EngineOptions) -> tuple[Buffer, ...]:
    """llama.cpp's own dry run (no_alloc, no mmap, as its --fit does): sizes the buffers a load would
    allocate on each backend without allocating them. It reports the compute buffers exactly; model and
    KV buffers come back as 0-byte placeholders (the planner computes those from the index)."""
    lib = llama_cpp()
    overrides = _override_array(placement)
    devices = model_devices(placement)
    params = lib.llama_model_default_params()
    params.n_gpu_layers = devices.n_gpu_layers
    if devices.devices is not None:
        params.devices = ctypes.cast(devices.devices, ctypes.c_void_p)
    split = (ctypes.c_float * len(devices.tensor_split))(*devices.tensor_split) if devices.tensor_split else None
    if split is not None:
        params.tensor_split = split
    if overrides is not None:
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        params.use_extra_bufts = options.repack
    params.no_alloc = True
    params.load_mode = lib.LLAMA_LOAD_MODE_NONE
    with captured_log() as lines:
        model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise RuntimeLoadError(f"{path}: llama.cpp's dry run could not load the model: {last_line(lines)}")
        try:
            cparams = lib.llama_context_default_params()
            cparams.n_ctx, cparams.n_batch = placement.ctx, options.batch or 512
            cparams.n_ubatch = min(options.ubatch or 512, cparams.n_batch)
            cparams.n_threads = cparams.n_threads_batch = options.threads or default_threads()
            cparams.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attention
                                       else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            cparams.type_k = cparams.type_v = KV_TYPES[options.kv_cache_type or "f16"]
            ctx = lib.llama_init_from_model(model, cparams)
            if not ctx:
                raise RuntimeLoadError(f"{path}: llama.cpp's dry run could not create a context: {last_line(lines)}")
            lib.llama_free(ctx)
        finally:
            lib.llama_model_free(model)
    # A registered scheduler plugin shares the CPU's buffer type; a real load allocates that compute buffer
    # once, the dry run reports it once per backend.
    buffers = parse_buffers(lines)
    return tuple(b for i, b in enumerate(buffers) if b.kind != "compute" or b.name not in
                 {a.name for a in buffers[:i] if a.kind == "compute"})


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], type_name: str,
             n_threads: int | None = None) -> None:
    """Re-quantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize`); type_name as llama.cpp's
    LLAMA_FTYPE_MOSTLY_* names it: q8_0, q4_k_m, q5_k_m, q6_k, f16, bf16, ..."""
    lib = llama_cpp()
    ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        raise RotaryError(f"unknown llama.cpp quantization type {type_name!r}")
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, n_threads or default_threads()
    with captured_log() as lines:
        failed = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if failed:
        raise RuntimeLoadError(f"{src}: llama.cpp could not quantize to {type_name}: {last_line(lines)}")

"""The llama.cpp runtime: the only module that imports llama_cpp.

Loads a GGUF through llama-cpp-python 0.3.36 with a placement applied as
`llama_model_params.tensor_buft_overrides` (ARCHITECTURE.md section 3), captures llama.cpp's own
accounting of the buffers it allocates, and generates tokens. Works unchanged with a CUDA build of
llama-cpp-python or a CUDA libllama given by LLAMA_CPP_LIB_PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rotary_gguf import plugin as rotary_plugin
from rotary_gguf.errors import RotaryError, RuntimeLoadError
from rotary_gguf.gguf import open_index
from rotary_gguf.plan import ROTARY_MAX_BATCH_GPU, Placement
from rotary_gguf.profile import Profile
from rotary_gguf.rotation import LayerShape, Rotation

log = logging.getLogger(__name__)
PluginError = rotary_plugin.PluginError
llama_log = logging.getLogger("llama.cpp")

GPU_DEVICE, CPU_DEVICE = 1, 0  # enum ggml_backend_dev_type
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
_BUFFER_LINE = re.compile(r"^(\w+): +(\S+) +(model|KV|compute|output|RS) buffer size = +([0-9.]+) MiB")


class ContextError(RotaryError):
    """The prompt does not fit the context."""


@dataclass(frozen=True)
class Buffer:
    """One buffer llama.cpp reports at load: kind (model, KV, compute, output), buffer type name, bytes."""

    kind: str
    name: str
    nbytes: int

    @property
    def on_host(self) -> bool:
        return self.name.upper().startswith("CPU")


class _LogCapture:
    """llama.cpp's log callback, routed to the `llama.cpp` logger and captured while a load runs."""

    def __init__(self, llama_cpp: Any) -> None:
        self._captures: list[list[str]] = []
        self._partial = ""

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            self._on_text(text.decode("utf-8", errors="replace"))

        self._callback = callback  # keep the ctypes thunk alive
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def _on_text(self, text: str) -> None:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            llama_log.debug("%s", line)
            for lines in self._captures:
                lines.append(line)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect the lines logged while the block runs (captures may nest)."""
        lines: list[str] = []
        self._captures.append(lines)
        try:
            yield lines
        finally:
            self._captures.remove(lines)


_state: dict[str, Any] = {}


def _llama_cpp() -> Any:
    """llama_cpp, imported once, with rotary's log callback installed."""
    if "module" not in _state:
        import llama_cpp

        _state["module"] = llama_cpp
        _state["log"] = _LogCapture(llama_cpp)
    return _state["module"]


def library_dir() -> Path:
    """Where libllama and the ggml libraries come from: LLAMA_CPP_LIB_PATH or the llama_cpp package."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    return Path(_llama_cpp().__file__).parent / "lib"


def _ggml() -> ctypes.CDLL:
    """libggml.so.0 and libggml-cpu.so.0 as libllama loaded them: by bare soname, which the dynamic loader
    answers with the copy already loaded (a copy loaded by another path would be a second ggml, with its
    own backend registry); by path in library_dir() only if libllama has not loaded them."""
    if "ggml" not in _state:
        _llama_cpp()  # loads libllama and, through it, its ggml
        folder = library_dir()
        libs = {}
        for name in ("libggml-base.so.0", "libggml.so.0", "libggml-cpu.so.0"):
            try:
                libs[name] = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
            except OSError:
                try:
                    libs[name] = ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
                except OSError as exc:
                    raise RuntimeLoadError(f"{folder / name}: cannot load ggml library: {exc}") from None
        ggml, cpu = libs["libggml.so.0"], libs["libggml-cpu.so.0"]
        for fn, restype, argtypes in (
            (ggml.ggml_backend_dev_by_type, ctypes.c_void_p, [ctypes.c_int]),
            (ggml.ggml_backend_dev_buffer_type, ctypes.c_void_p, [ctypes.c_void_p]),
            (ggml.ggml_backend_dev_description, ctypes.c_char_p, [ctypes.c_void_p]),
            (cpu.ggml_backend_cpu_buffer_type, ctypes.c_void_p, []),
        ):
            fn.restype, fn.argtypes = restype, argtypes
        _state["ggml"], _state["ggml_cpu"] = ggml, cpu
    return _state["ggml"]


def gpu_device_name() -> str | None:
    """The first GPU device of the loaded llama.cpp build, or None for a CPU-only build."""
    _llama_cpp().llama_backend_init()
    dev = _ggml().ggml_backend_dev_by_type(GPU_DEVICE)
    return _state["ggml"].ggml_backend_dev_description(dev).decode() if dev else None


def rotary_device() -> str | None:
    """Where rotary expert slots can live in this process: "cpu" when ROTARY_SCHED_DEVICE=cpu (a second CPU
    backend stands in for the GPU), "gpu" with a GPU build of llama.cpp, else None."""
    if os.environ.get(rotary_plugin.DEVICE_ENV, "").strip().lower() == "cpu":
        return "cpu"
    return "gpu" if gpu_device_name() else None


def scheduler_plugin(device_fallback: str | None = None) -> rotary_plugin.Plugin:
    """The scheduler plugin, loaded, checked against this llama-cpp-python and registered as a ggml device
    once per process (a failure to load is remembered: PluginError with the same reason every time).
    device_fallback ("cpu") serves callers that only count routing, where no GPU is needed."""
    device = rotary_device() or device_fallback
    if device is None:
        raise rotary_plugin.PluginError(
            "rotary needs a GPU and this llama.cpp build has none (ROTARY_SCHED_DEVICE=cpu runs the scheduler "
            "on a CPU stand-in device)")
    if "plugin" not in _state:
        try:
            _llama_cpp().llama_backend_init()
            _ggml()
            plugin = rotary_plugin.Plugin(rotary_plugin.plugin_path(), _llama_cpp().__version__)
            plugin.register(device)
            _state["plugin"] = plugin
        except rotary_plugin.PluginError as exc:
            _state["plugin"] = exc
    if isinstance(_state["plugin"], rotary_plugin.PluginError):
        raise _state["plugin"]
    return _state["plugin"]


def rotary_unavailable() -> str | None:
    """Why --placement rotary cannot run here, or None when it can."""
    try:
        scheduler_plugin()
    except rotary_plugin.PluginError as exc:
        return str(exc)
    return None


def _attach_scheduler(path: Path, placement: Placement | None, rotation: dict[str, Any]) -> Rotation | None:
    """Before a load: configure the plugin for a rotary placement (slots allocated, empty) and set up its
    rotation, or make a registered plugin claim nothing for any other placement."""
    if placement is None or placement.strategy != "rotary":
        if isinstance(_state.get("plugin"), rotary_plugin.Plugin):
            _state["plugin"].reset()
        return None
    rotation = dict(rotation)
    plugin = scheduler_plugin(rotation.pop("device_fallback", None))
    max_batch = rotation.pop("max_batch", None)  # None: the default; <= 0: every batch
    if max_batch is None:
        max_batch = int(os.environ.get("ROTARY_SCHED_MAX_BATCH", "0") or 0) or (
            ROTARY_MAX_BATCH_GPU if rotary_device() == "gpu" else 0)
    index = open_index(path)
    plugin.configure(index, max_batch=max_batch)
    layers = {layer: LayerShape(plugin.n_expert(layer), index.params.n_expert_used, plugin.set_slots(layer, n),
                                index.slot_bytes(layer)) for layer, n in placement.expert_slots}
    from rotary_gguf.embed import load_calibration  # the calibration module itself runs models through here

    calibration, source = load_calibration(index)
    if calibration is None and "stale" in source:
        log.warning("%s", source)
    popularity = calibration.popularity() if calibration else None
    rotation.setdefault("prior", popularity)
    state = Rotation(plugin, layers, **rotation)
    if popularity:
        state.seed_from_popularity(popularity)
    return state


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _override_array(placement: Placement) -> ctypes.Array | None:
    """The NULL-terminated llama_model_tensor_buft_override array of a placement (None: no overrides)."""
    if not placement.overrides:
        return None
    ggml = _ggml()
    cpu = _state["ggml_cpu"].ggml_backend_cpu_buffer_type()
    gpu_dev = ggml.ggml_backend_dev_by_type(GPU_DEVICE)
    gpu = ggml.ggml_backend_dev_buffer_type(gpu_dev) if gpu_dev else cpu
    entries = [(o.pattern.encode(), cpu if o.buffer == "CPU" else gpu) for o in placement.overrides]
    array = (_Override * (len(entries) + 1))(*entries, (None, None))
    return array


@contextlib.contextmanager
def _llama_construction(overrides: ctypes.Array | None, repack: bool = False) -> Iterator[None]:
    """While Llama() runs: llama-cpp-python never sets tensor_buft_overrides (its field is 'unused'), so
    hand it default params that already carry ours; and defer its chat-template compilation."""
    llama_cpp = _llama_cpp()
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params

    def default_params() -> Any:
        params = original()
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        if overrides is not None and not repack:
            # Overrides to the CPU buffer type still pick the CPU's repacking buffer types (llama.cpp
            # src/llama-model-loader.cpp, "check overrides"), which copy the experts out of the mmap.
            params.use_extra_bufts = False
        return params

    formatters = llama_cpp.llama_chat_format
    eager = formatters.Jinja2ChatFormatter

    class LazyFormatter:
        """Llama() compiles every chat template in the file at load, so a broken template would stop the
        model from loading at all; compile on first use instead (rotary renders templates itself)."""

        def __init__(self, **kwargs: Any) -> None:
            self._kwargs = kwargs

        def to_chat_handler(self) -> Any:
            return lambda *args, **kw: eager(**self._kwargs).to_chat_handler()(*args, **kw)

    module.llama_model_default_params = default_params
    formatters.Jinja2ChatFormatter = LazyFormatter
    try:
        yield
    finally:
        module.llama_model_default_params = original
        formatters.Jinja2ChatFormatter = eager


@dataclass
class LoadedModel:
    """A llama_cpp.Llama with the placement it was loaded with and llama.cpp's buffer accounting."""

    llm: Any
    path: Path
    placement: Placement | None
    buffers: tuple[Buffer, ...]
    gpu: str | None
    load_seconds: float
    rss_before_load: int
    log_lines: tuple[str, ...] = field(default=(), repr=False)  # llama.cpp's log of this load
    residency: Rotation | None = None  # the rotary scheduler's slots and their rotation (rotary placement)
    _keepalive: Any = field(default=None, repr=False)

    def buffer_bytes(self, *, host: bool | None = None, kind: str | None = None) -> int:
        return sum(b.nbytes for b in self.buffers
                   if (host is None or b.on_host == host) and (kind is None or b.kind == kind))


def parse_buffers(lines: list[str]) -> tuple[Buffer, ...]:
    """Buffer sizes from llama.cpp's load log ('load_tensors: CPU_Mapped model buffer size = 1.00 MiB')."""
    found = []
    for line in lines:
        m = _BUFFER_LINE.match(line.strip())
        if m:
            found.append(Buffer(m.group(3), m.group(2), round(float(m.group(4)) * 2**20)))
    return tuple(found)


def default_threads() -> int:
    """Physical cores (llama.cpp's own default counts logical ones, which hurts on SMT machines)."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def load(path: str | os.PathLike[str], placement: Placement | None = None, *, n_ctx: int = 512,
         n_threads: int | None = None, n_batch: int = 512, n_ubatch: int = 512, flash_attn: bool = False,
         kv_cache_type: str = "f16", seed: int = 0, repack: bool = False,
         rotation: dict[str, Any] | None = None) -> LoadedModel:
    """Load a GGUF with the placement's overrides and GPU layers (no placement: llama.cpp's defaults, CPU).

    Host-resident experts stay zero-copy in the mmap unless `repack=True`, which lets llama.cpp copy them
    into its CPU repacking buffers (more RAM; faster CPU matmuls for some types). `rotation` holds the
    keyword arguments of rotation.Rotation for a rotary placement (policy, pcie_gbs, budget_bytes, ...).
    """
    llama_cpp = _llama_cpp()
    path = Path(path)
    threads = n_threads or default_threads()
    overrides = _override_array(placement) if placement else None
    gpu = gpu_device_name()
    residency = _attach_scheduler(path, placement, rotation or {})
    rss = rss_bytes()
    started = time.perf_counter()
    with _state["log"].capture() as lines, _llama_construction(overrides, repack):
        try:
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=n_batch, n_ubatch=min(n_ubatch, n_batch), flash_attn=flash_attn,
                type_k=KV_TYPES[kv_cache_type], type_v=KV_TYPES[kv_cache_type],
                n_gpu_layers=placement.n_gpu_layers if placement else 0, seed=seed, verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            reason = _last(lines) if lines else str(exc)
            raise RuntimeLoadError(f"{path}: llama.cpp could not load the model: {reason}") from None
    return LoadedModel(llm, path, placement, parse_buffers(lines), gpu, time.perf_counter() - started, rss,
                       tuple(lines), residency, overrides)


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], type_name: str,
             n_threads: int | None = None) -> None:
    """Re-quantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize`); type_name as llama.cpp's
    LLAMA_FTYPE_MOSTLY_* names it: q8_0, q4_k_m, q5_k_m, q6_k, f16, bf16, ..."""
    llama_cpp = _llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        raise RotaryError(f"unknown llama.cpp quantization type {type_name!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, n_threads or default_threads()
    with _state["log"].capture() as lines:
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if failed:
        raise RuntimeLoadError(f"{src}: llama.cpp could not quantize to {type_name}: {_last(lines)}")


def context_options(placement: Placement, profile: Profile, *, threads: int | None = None,
                    repack: bool = False) -> dict[str, Any]:
    """The load()/dry_run() keyword arguments a placement and its profile imply."""
    return dict(n_ctx=placement.ctx, n_threads=threads or profile.threads, n_batch=profile.batch,
                n_ubatch=profile.ubatch, flash_attn=profile.flash_attention, kv_cache_type=profile.kv_cache_type,
                repack=repack)


def rotation_options(profile: Profile, *, policy: str | None = None, budget_bytes: int | None = None,
                     trace: Any = None, rotate: bool = True) -> dict[str, Any]:
    """load()'s `rotation` argument for a profile: its policy and PCIe bandwidth, unless overridden."""
    return dict(policy=policy or profile.rotation_policy, pcie_gbs=profile.pcie_gbs, budget_bytes=budget_bytes,
                trace=trace, rotate=rotate)


def dry_run(path: str | os.PathLike[str], placement: Placement, *, n_ctx: int, n_threads: int | None = None,
            n_batch: int = 512, n_ubatch: int = 512, flash_attn: bool = False, kv_cache_type: str = "f16",
            repack: bool = False) -> tuple[Buffer, ...]:
    """llama.cpp's own dry run (no_alloc, no mmap, as its --fit does): sizes the buffers a load would
    allocate on each backend without allocating them. It reports the compute buffers exactly; model and
    KV buffers come back as 0-byte placeholders (the planner computes those from the index)."""
    llama_cpp = _llama_cpp()
    overrides = _override_array(placement)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = placement.n_gpu_layers
    if overrides is not None:
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        params.use_extra_bufts = repack
    params.no_alloc = True
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    with _state["log"].capture() as lines:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise RuntimeLoadError(f"{path}: llama.cpp's dry run could not load the model: {_last(lines)}")
        try:
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, min(n_ubatch, n_batch)
            cparams.n_threads = cparams.n_threads_batch = n_threads or default_threads()
            cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                       else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            cparams.type_k = cparams.type_v = KV_TYPES[kv_cache_type]
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                raise RuntimeLoadError(f"{path}: llama.cpp's dry run could not create a context: {_last(lines)}")
            llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)
    # The scheduler plugin's backend shares the CPU's buffer type; a real load allocates that compute buffer
    # once, the dry run reports it once per backend.
    buffers = parse_buffers(lines)
    return tuple(b for i, b in enumerate(buffers) if b.kind != "compute" or b.name not in
                 {a.name for a in buffers[:i] if a.kind == "compute"})


def _last(lines: list[str]) -> str:
    """llama.cpp's last log line before giving up says why ("K cache type q8_0 ... does not divide")."""
    return next((line.strip() for line in reversed(lines) if line.strip()), "no reason logged")


@dataclass(frozen=True)
class Generation:
    """Tokens generated after a prompt, with wall-clock timings."""

    prompt_tokens: int
    tokens: tuple[int, ...]
    text: str
    prompt_seconds: float
    decode_seconds: float
    stopped_at_eos: bool
    interrupted: bool = False  # Ctrl-C ended the decode early

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def generate(llm: Any, prompt: str, max_tokens: int, *, temp: float = 0.0, seed: int = 0,
             stream: Any = None, keep_state: bool = False,
             residency: Rotation | None = None) -> Generation:
    """Decode up to max_tokens after prompt (greedy at temp 0), stopping at an end-of-generation token.

    `stream(text)` receives text pieces as they are decoded (whole UTF-8 characters only).
    `keep_state=True` reuses the KV cache for the prompt's longest common prefix with what was evaluated.
    `residency` (a rotary model's) seeds the expert slots from the prompt's routing before decoding.
    """
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    return generate_ids(llm, prompt_ids, max_tokens, temp=temp, seed=seed, stream=stream, keep_state=keep_state,
                        residency=residency)


def _common_prefix(a: list[int], b: Any) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def generate_ids(llm: Any, prompt_ids: list[int], max_tokens: int, *, temp: float = 0.0, seed: int = 0,
                 stream: Any = None, keep_state: bool = False, ignore_eos: bool = False,
                 residency: Rotation | None = None) -> Generation:
    """generate() from token ids; `ignore_eos=True` always decodes max_tokens (benchmarks)."""
    llama_cpp = _llama_cpp()
    n_ctx = context_size(llm)
    if len(prompt_ids) >= n_ctx:
        raise ContextError(f"the prompt has {len(prompt_ids)} tokens and the context holds {n_ctx}; "
                           f"use a larger --ctx or a shorter prompt")
    max_tokens = min(max_tokens, n_ctx - len(prompt_ids))
    reuse = _common_prefix(prompt_ids, llm.input_ids[: llm.n_tokens]) if keep_state else 0
    reuse = min(reuse, len(prompt_ids) - 1)  # evaluate at least one token to get fresh logits
    llm.n_tokens = max(reuse, 0)
    if not keep_state:
        llm.reset()
    llm.set_seed(seed)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    started = time.perf_counter()
    if residency:
        residency.before_prompt()
    try:
        llm.eval(prompt_ids[llm.n_tokens:])
    except KeyboardInterrupt:
        if stream is None:
            raise
        # Stopped while reading the prompt: llm.eval drops any KV cells past n_tokens on the next call.
        return Generation(len(prompt_ids), (), "", time.perf_counter() - started, 0.0, False, True)
    if residency:
        residency.after_prompt()
    prompt_seconds = time.perf_counter() - started
    tokens: list[int] = []
    pending = b""
    stopped = interrupted = False
    started = time.perf_counter()
    try:
        while len(tokens) < max_tokens:
            token = llm.sample(temp=temp, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)
            if not ignore_eos and llama_cpp.llama_vocab_is_eog(vocab, token):
                stopped = True
                break
            tokens.append(token)
            if stream is not None:
                pending += llm.detokenize([token], prev_tokens=tokens[:-1])
                text, pending = _complete_utf8(pending)
                if text:
                    stream(text)
            llm.eval([token])
            if residency:
                residency.after_token()
    except KeyboardInterrupt:
        if stream is None:
            raise
        interrupted = True  # the caller asked to stop this reply; the KV cache stays consistent
    decode_seconds = time.perf_counter() - started
    text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    return Generation(len(prompt_ids), tuple(tokens), text, prompt_seconds, decode_seconds, stopped, interrupted)


def context_size(llm: Any) -> int:
    """Tokens the context holds: llama.cpp may round n_ctx up, llama-cpp-python's buffers keep the asked size."""
    return min(llm.n_ctx(), len(llm.input_ids))


def special_token_texts(llm: Any) -> tuple[str, str]:
    """The texts of the model's BOS and EOS tokens (empty when it has none)."""
    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    return text(llm.token_bos()), text(llm.token_eos())


def _complete_utf8(data: bytes) -> tuple[str, bytes]:
    """Split bytes into the decodable text and an incomplete trailing UTF-8 sequence."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""


def last_logits(llm: Any) -> np.ndarray:
    """Logits of the last evaluated token, read from llama.cpp (llama-cpp-python keeps them only with
    logits_all)."""
    ptr = _llama_cpp().llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

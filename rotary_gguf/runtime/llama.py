"""llama.cpp in this process: llama-cpp-python imported once with rotary's log callback, the ggml libraries
libllama loaded, and what they report (GPU device, buffer sizes in the load log)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from rotary_gguf import environment
from rotary_gguf.errors import RuntimeLoadError

llama_log = logging.getLogger("llama.cpp")

GPU_DEVICE, CPU_DEVICE = 1, 0  # enum ggml_backend_dev_type
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
# Kinds: model, KV, RS (recurrent state), compute, output, and deepseek4's "DSV4 <name> state" (as "state").
_BUFFER_LINE = re.compile(r"^(\w+): +(\S+) +(model|KV|compute|output|RS|DSV4 \S+ state) buffer size = +([0-9.]+) MiB")


@dataclass(frozen=True)
class Buffer:
    """One buffer llama.cpp reports at load: kind (model, KV, RS, state, compute, output), buffer type, bytes."""

    kind: str
    name: str
    nbytes: int

    @property
    def on_host(self) -> bool:
        """Host memory: CPU buffers, and a GPU backend's pinned host buffers (CUDA_Host)."""
        name = self.name.upper()
        return name.startswith("CPU") or name.endswith("_HOST")


class LogCapture:
    """llama.cpp's log callback, routed to the `llama.cpp` logger and captured while a block runs."""

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


def llama_cpp() -> Any:
    """llama_cpp, imported once, with rotary's log callback installed and the backends initialised."""
    if "module" not in _state:
        import llama_cpp as module

        _state["log"] = LogCapture(module)
        module.llama_backend_init()
        _state["module"] = module
    return _state["module"]


def captured_log() -> contextlib.AbstractContextManager[list[str]]:
    """The lines llama.cpp logs while the block runs."""
    llama_cpp()
    return _state["log"].capture()


def last_line(lines: list[str]) -> str:
    """llama.cpp's last log line before giving up says why ("K cache type q8_0 ... does not divide")."""
    return next((line.strip() for line in reversed(lines) if line.strip()), "no reason logged")


def library_dir() -> Path:
    """Where libllama and the ggml libraries come from: LLAMA_CPP_LIB_PATH or the llama_cpp package."""
    return environment.library_override() or Path(llama_cpp().__file__).parent / "lib"


def ggml() -> ctypes.CDLL:
    """libggml.so.0 as libllama loaded it: by bare soname, which the dynamic loader answers with the copy
    already loaded (a copy loaded by another path would be a second ggml, with its own backend registry);
    by path in library_dir() only if libllama has not loaded it. ggml_cpu() is libggml-cpu.so.0 alike."""
    if "ggml" not in _state:
        llama_cpp()  # loads libllama and, through it, its ggml
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
        lib, cpu = libs["libggml.so.0"], libs["libggml-cpu.so.0"]
        for fn, restype, argtypes in (
            # ggml_backend_dev_t ggml_backend_dev_by_type(enum ggml_backend_dev_type type);
            (lib.ggml_backend_dev_by_type, ctypes.c_void_p, [ctypes.c_int]),
            # ggml_backend_buffer_type_t ggml_backend_dev_buffer_type(ggml_backend_dev_t device);
            (lib.ggml_backend_dev_buffer_type, ctypes.c_void_p, [ctypes.c_void_p]),
            # const char * ggml_backend_dev_description(ggml_backend_dev_t device);
            (lib.ggml_backend_dev_description, ctypes.c_char_p, [ctypes.c_void_p]),
            # ggml_backend_buffer_type_t ggml_backend_cpu_buffer_type(void);
            (cpu.ggml_backend_cpu_buffer_type, ctypes.c_void_p, []),
        ):
            fn.restype, fn.argtypes = restype, argtypes
        _state["ggml"], _state["ggml_cpu"] = lib, cpu
    return _state["ggml"]


def cpu_buffer_type() -> int:
    ggml()
    return _state["ggml_cpu"].ggml_backend_cpu_buffer_type()


def gpu_buffer_type() -> int | None:
    dev = ggml().ggml_backend_dev_by_type(GPU_DEVICE)
    return ggml().ggml_backend_dev_buffer_type(dev) if dev else None


def gpu_device_name() -> str | None:
    """The first GPU device of the loaded llama.cpp build, or None for a CPU-only build."""
    dev = ggml().ggml_backend_dev_by_type(GPU_DEVICE)
    return ggml().ggml_backend_dev_description(dev).decode() if dev else None


def parse_buffers(lines: list[str]) -> tuple[Buffer, ...]:
    """Buffer sizes from llama.cpp's load log ('load_tensors: CPU_Mapped model buffer size = 1.00 MiB')."""
    found = []
    for line in lines:
        m = _BUFFER_LINE.match(line.strip())
        if m:
            kind = "state" if m.group(3).startswith("DSV4") else m.group(3)
            found.append(Buffer(kind, m.group(2), round(float(m.group(4)) * 2**20)))
    return tuple(found)


def default_threads() -> int:
    """Physical cores (llama.cpp's own default counts logical ones, which hurts on SMT machines)."""
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss

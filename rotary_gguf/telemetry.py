"""What a run costs: host RSS (psutil) and, when an NVIDIA GPU exists, VRAM (pynvml), sampled or peak."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Telemetry:
    rss_bytes: int
    vram_used_bytes: int | None  # this process on GPU 0 when the driver says, else the whole GPU
    vram_total_bytes: int | None


class _Nvml:
    """NVML opened once (None where there is no NVIDIA driver), read as often as needed, then closed."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no driver, no library: no VRAM to report
            return
        self._nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def read(self) -> tuple[int, int] | None:
        """(bytes this process uses on GPU 0, total); the whole GPU's use when the driver hides processes."""
        if self.handle is None:
            return None
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(self.handle)
        try:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory), int(memory.total)
        except nvml.NVMLError:
            pass
        return int(memory.used), int(memory.total)

    def close(self) -> None:
        if self.handle is not None:
            self._nvml.nvmlShutdown()
            self.handle = None


def sample_telemetry() -> Telemetry:
    nvml = _Nvml()
    try:
        vram = nvml.read()
    finally:
        nvml.close()
    rss = psutil.Process().memory_info().rss
    return Telemetry(rss, vram[0] if vram else None, vram[1] if vram else None)


class PeakSampler:
    """Samples RSS and VRAM every `interval` seconds in a thread while the block runs; keeps the peaks."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_vram: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._process = psutil.Process()
        self._nvml: _Nvml | None = None

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        vram = self._nvml.read() if self._nvml else None
        if vram:
            self.peak_vram = max(self.peak_vram or 0, vram[0])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._nvml = _Nvml()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._nvml.close()

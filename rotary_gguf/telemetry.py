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


def _vram() -> tuple[int, int] | None:
    """(bytes this process uses on GPU 0, total) or None without an NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no VRAM to report
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        used = None
        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    used = int(proc.usedGpuMemory)
        except pynvml.NVMLError:
            pass
        if used is None:
            used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        return used, total
    finally:
        pynvml.nvmlShutdown()


def sample_telemetry() -> Telemetry:
    vram = _vram()
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
        self._has_gpu = _vram() is not None

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)
        if self._has_gpu:
            vram = _vram()
            if vram:
                self.peak_vram = max(self.peak_vram or 0, vram[0])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

"""Hardware profiles: one validated YAML schema, packaged profiles, a user's own file, GPU detection."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rotary_gguf.errors import RotaryError
from rotary_gguf.rotation import DEFAULT_POLICY, POLICIES

log = logging.getLogger(__name__)

KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
          "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}


class ProfileError(RotaryError):
    """A profile is missing, or its file breaks the schema."""


@dataclass(frozen=True)
class Profile:
    """What the planner knows of a machine; sizes in bytes, bandwidths in GB/s."""

    name: str
    description: str
    source: str
    gpu_match: tuple[str, ...]
    vram_total_bytes: int
    vram_budget_bytes: int
    ctx: int
    kv_cache_type: str
    batch: int
    ubatch: int
    threads: int | None  # None: physical cores
    flash_attention: bool
    gpu_memory_gbs: float
    host_ram_gbs: float
    pcie_gbs: float
    gpu_overhead_bytes: int  # CUDA context, cuBLAS workspace and pools, beyond llama.cpp's buffers
    rotation_policy: str = DEFAULT_POLICY  # the rotary scheduler's slot policy (rotation.POLICIES)

    @property
    def has_gpu(self) -> bool:
        return self.vram_total_bytes > 0

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"gpu_match": list(self.gpu_match)}


def parse_size(value: Any, what: str = "size") -> int:
    """'6.4GiB', '512 MiB', '8GB', 1024 -> bytes (K/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a size such as 6GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what}: must not be negative, got {value}")
        return int(value)
    m = _SIZE.match(str(value))
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"{what}: expected a size such as 6GiB or 6500MiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[unit])


# The schema: key -> (required, converter). Converters raise ValueError with a readable reason.
def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def _non_negative_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"expected a non-negative number, got {v!r}")
    return float(v)


def _threads(v: Any) -> int | None:
    return None if v == "auto" else _positive_int(v)


def _kv_type(v: Any) -> str:
    if v not in KV_CACHE_TYPES:
        raise ValueError(f"expected one of {', '.join(KV_CACHE_TYPES)}, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected text, got {v!r}")
    return v


def _patterns(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ValueError(f"expected a list of GPU name patterns, got {v!r}")
    return tuple(v)


_TOP = {"description": (True, _text), "gpu": (True, None), "vram_budget": (True, None), "ctx": (True, _positive_int),
        "kv_cache_type": (False, _kv_type), "batch": (False, _positive_int), "ubatch": (False, _positive_int),
        "threads": (False, _threads), "flash_attention": (False, _bool), "bandwidth": (True, None),
        "gpu_overhead": (False, None), "rotation_policy": (False, None)}
_GPU = {"match": (True, _patterns), "vram_total": (True, None)}
_BANDWIDTH = {"gpu_memory_gbs": (True, _non_negative_number), "host_ram_gbs": (True, _non_negative_number),
              "pcie_gbs": (True, _non_negative_number)}
DEFAULT_GPU_OVERHEAD = 400 * 2**20


def _check_keys(where: str, data: Any, schema: dict[str, tuple[bool, Any]]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(schema)})")
    missing = [k for k, (required, _) in schema.items() if required and k not in data]
    if missing:
        raise ProfileError(f"{where}: missing key {missing[0]!r}")
    out = {}
    for key, value in data.items():
        convert = schema[key][1]
        try:
            out[key] = convert(value) if convert else value
        except ValueError as exc:
            raise ProfileError(f"{where}: key {key!r}: {exc}") from None
    return out


def _budget(where: str, value: Any, vram_total: int) -> int:
    """An absolute size, or a fraction (0-1] of the GPU's total VRAM."""
    if isinstance(value, float) and 0 < value <= 1:
        return int(value * vram_total)
    try:
        budget = parse_size(value, "vram_budget")
    except ValueError as exc:
        raise ProfileError(f"{where}: key 'vram_budget': {exc}") from None
    if vram_total and budget > vram_total:
        raise ProfileError(f"{where}: key 'vram_budget': {budget / 2**30:.2f} GiB is more than the GPU's "
                           f"{vram_total / 2**30:.2f} GiB")
    return budget


def profile_from_dict(name: str, data: Any, source: str) -> Profile:
    """Validate one profile's YAML data (unknown keys and bad values are errors naming the file and key)."""
    top = _check_keys(source, data, _TOP)
    gpu = top["gpu"]
    if gpu is None:
        patterns, vram_total = (), 0
    else:
        g = _check_keys(f"{source}: gpu", gpu, _GPU)
        patterns = g["match"]
        try:
            vram_total = parse_size(g["vram_total"], "vram_total")
        except ValueError as exc:
            raise ProfileError(f"{source}: key 'gpu.vram_total': {exc}") from None
    bw = _check_keys(f"{source}: bandwidth", top["bandwidth"], _BANDWIDTH)
    try:
        overhead = parse_size(top.get("gpu_overhead", DEFAULT_GPU_OVERHEAD), "gpu_overhead")
    except ValueError as exc:
        raise ProfileError(f"{source}: key 'gpu_overhead': {exc}") from None
    batch, ubatch = top.get("batch", 2048), top.get("ubatch", 512)
    if ubatch > batch:
        raise ProfileError(f"{source}: key 'ubatch': {ubatch} is larger than batch {batch}")
    return Profile(
        name=name, description=top["description"], source=source, gpu_match=patterns,
        vram_total_bytes=vram_total, vram_budget_bytes=_budget(source, top["vram_budget"], vram_total),
        ctx=top["ctx"], kv_cache_type=top.get("kv_cache_type", "f16"), batch=batch, ubatch=ubatch,
        threads=top.get("threads"), flash_attention=top.get("flash_attention", True),
        gpu_memory_gbs=bw["gpu_memory_gbs"], host_ram_gbs=bw["host_ram_gbs"], pcie_gbs=bw["pcie_gbs"],
        gpu_overhead_bytes=overhead if vram_total else 0, rotation_policy=_policy(source, top),
    )


def _policy(source: str, top: dict[str, Any]) -> str:
    policy = top.get("rotation_policy", DEFAULT_POLICY)
    if policy not in POLICIES:
        raise ProfileError(f"{source}: key 'rotation_policy': {policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def _load_file(path: Path, name: str) -> Profile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return profile_from_dict(name, data, str(path))


def _packaged() -> dict[str, Any]:
    try:
        folder: Any = resources.files("rotary_gguf.profiles")
    except ModuleNotFoundError:  # run from a source checkout on PYTHONPATH, not installed
        folder = Path(__file__).resolve().parents[1] / "profiles"
    return {p.name[: -len(".yaml")]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def profile_names() -> list[str]:
    return sorted(_packaged())


def load_profile(name_or_path: str) -> Profile:
    """A packaged profile by name, or a user's YAML file by path ('auto' is resolved by detect_profile)."""
    if name_or_path == "auto":
        return detect_profile().profile
    packaged = _packaged()
    if name_or_path in packaged:
        with resources.as_file(packaged[name_or_path]) as path:
            return _load_file(Path(path), name_or_path)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
        return _load_file(path, path.stem)
    raise ProfileError(f"unknown profile {name_or_path!r}; known: {', '.join(sorted(packaged))}, or a .yaml path")


@dataclass(frozen=True)
class Detection:
    profile: Profile
    gpu_name: str | None
    vram_total_bytes: int
    vram_free_bytes: int
    ram_total_bytes: int
    physical_cores: int
    reason: str


def _nvml_gpu() -> tuple[str, int, int] | str:
    """(name, total, free) of GPU 0, or why there is none."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses vary with the driver; any failure means no GPU here
        return f"no NVIDIA driver ({exc})"
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return "NVML reports no GPU"
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return (name.decode() if isinstance(name, bytes) else name), int(memory.total), int(memory.free)
    finally:
        pynvml.nvmlShutdown()


def detect_profile() -> Detection:
    """Pick the profile for this machine: the packaged profile whose name patterns match GPU 0 (and whose
    VRAM is not more than the card's); an unknown GPU gets 85% of its VRAM; no NVIDIA GPU gets cpu-only."""
    import psutil

    ram, cores = psutil.virtual_memory().total, psutil.cpu_count(logical=False) or os.cpu_count() or 1
    gpu = _nvml_gpu()
    if isinstance(gpu, str):
        return Detection(load_profile("cpu-only"), None, 0, 0, ram, cores, f"no NVIDIA GPU: {gpu}; using cpu-only")
    name, total, free = gpu
    for candidate in profile_names():
        profile = load_profile(candidate)
        patterns = [re.compile(p, re.IGNORECASE) for p in profile.gpu_match]
        if any(p.search(name) for p in patterns) and profile.vram_total_bytes <= total * 1.05:
            return Detection(profile, name, total, free, ram, cores, f"{name} matches profile {candidate}")
    generic = replace(load_profile("rtx3060-12gb"), name="detected", description=f"{name} (no packaged profile)",
                      gpu_match=(re.escape(name),), vram_total_bytes=total, vram_budget_bytes=int(total * 0.85))
    return Detection(generic, name, total, free, ram, cores,
                     f"{name} matches no packaged profile; using 85% of its {total / 2**30:.1f} GiB")

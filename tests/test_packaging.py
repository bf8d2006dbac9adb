"""A normal (non-editable) install: the wheel's contents, the installed `rotary` command, `rotary plugin build`
from the installed package; and scripts/setup_env.sh's choice between the CPU and the CUDA llama.cpp build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from rotary_gguf.cache import cache_dir
from rotary_gguf.plugin_build import llama_cpp_python_version

ROOT = Path(__file__).resolve().parents[1]
# The cache before conftest points ROTARY_CACHE at the session's folder (module import comes first): only read,
# for the ggml headers setup_env.sh fetched there.
_SETUP_CACHE = cache_dir()
_NOT_BUILT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", "*.so", "*.part")
_SHIPPED_MODELS = ROOT / "rotary_gguf" / "data" / "models"


def _NOT_SOURCE(folder: str, names: list[str]) -> set[str]:
    """What the copy leaves out: build outputs and every GGUF but the shipped model (as .gitignore does)."""
    ignored = _NOT_BUILT(folder, names)
    if Path(folder).resolve() != _SHIPPED_MODELS:
        ignored |= {name for name in names if name.endswith(".gguf")}
    return ignored


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` makes, built from a copy of the source tree (setuptools' build/ folder in the
    checkout may hold stale files from earlier builds)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = (tmp / "dist").glob("rotary_gguf-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _source_files(folder: str, *patterns: str) -> list[Path]:
    return sorted(path.relative_to(ROOT / folder) for pattern in patterns for path in (ROOT / folder).rglob(pattern)
                  if "__pycache__" not in path.parts)


def test_wheel_has_every_module_of_every_subpackage(wheel_names: set[str]) -> None:
    for package in ("cli", "convert", "convert/models", "synth", "runtime", "data", "profiles"):
        assert f"rotary_gguf/{package}/__init__.py" in wheel_names, package
    modules = _source_files("rotary_gguf", "*.py")
    assert len(modules) > 40
    missing = [str(m) for m in modules if f"rotary_gguf/{m.as_posix()}" not in wheel_names]
    assert not missing, f"not in the wheel: {missing}"


def test_wheel_has_native_sources_profiles_and_data(wheel_names: set[str]) -> None:
    native = _source_files("native", "*.cpp", "*.h", "CMakeLists.txt")
    assert Path("CMakeLists.txt") in native and any(p.suffix == ".cpp" for p in native)
    profiles = _source_files("profiles", "*.yaml")
    assert len(profiles) >= 7
    expected = ([f"rotary_gguf/native/{p}" for p in native] + [f"rotary_gguf/profiles/{p}" for p in profiles]
                + ["rotary_gguf/data/bpe_vocab.json"]
                + [f"rotary_gguf/data/models/{name}" for name in ("stdlib-moe-q8_0.gguf", "PSF-LICENSE.txt",
                                                                  "README.txt", "training.json")])
    assert sorted(set(expected) - wheel_names) == []
    assert not [name for name in wheel_names if name.endswith(".so") or name.startswith(("tests/", "native/"))]


def test_wheel_metadata_has_console_script_and_spdx_license(wheel: Path, wheel_names: set[str]) -> None:
    with zipfile.ZipFile(wheel) as archive:
        info = {Path(name).name: archive.read(name).decode() for name in wheel_names if ".dist-info/" in name}
    entry_points = info["entry_points.txt"]
    assert "[console_scripts]" in entry_points
    assert "rotary = rotary_gguf.cli:main" in entry_points
    assert "License-Expression: MIT" in info["METADATA"]
    assert "Requires-Dist: llama-cpp-python==0.3.36" in info["METADATA"]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (not editable); its dependencies come from this environment's
    site-packages through a .pth file (a plain path entry: the .pth files there, among them rotary's own
    editable finder, are not processed)."""
    env = tmp_path_factory.mktemp("installed") / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--quiet", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "rotary-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def _run(env: Path, *args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    """A command of the installed venv, with none of the variables that would point it elsewhere."""
    environ = {k: v for k, v in os.environ.items() if k not in ("ROTARY_PLUGIN", "PYTHONPATH", "LLAMA_CPP_LIB_PATH")}
    environ.update(extra)
    return subprocess.run([str(env / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=environ,
                          cwd=cwd, timeout=600)


def test_installed_rotary_runs_from_the_installed_package(installed: Path, tmp_path: Path) -> None:
    where = _run(installed, "python", "-c", "import rotary_gguf.cli; print(rotary_gguf.cli.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed)
    helped = _run(installed, "rotary", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("plan", "chat", "bench", "convert", "plugin", "profiles"):
        assert command in helped.stdout
    listed = _run(installed, "rotary", "profiles", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "rtx4060-laptop-8gb" in listed.stdout and "cpu-only" in listed.stdout
    demo = _run(installed, "rotary", "demo", "--tokens", "8", cwd=tmp_path)  # the shipped model, installed
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.startswith("shipped ") and Path(demo.stdout.split()[1]).is_relative_to(installed)


@pytest.mark.slow
def test_installed_plugin_build_compiles_the_packaged_sources(installed: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    name = f"llama-cpp-python-{llama_cpp_python_version()}"
    fetched = [folder / "ggml-headers" / name for folder in (cache_dir(), _SETUP_CACHE)]
    for headers in fetched:  # reuse headers fetched before rather than download the sdist again
        if (headers / "src" / "ggml-backend-impl.h").is_file():
            (cache / "ggml-headers").mkdir(parents=True)
            (cache / "ggml-headers" / name).symlink_to(headers)
            break
    built = _run(installed, "rotary", "plugin", "build", cwd=tmp_path, ROTARY_CACHE=str(cache))
    assert built.returncode == 0, built.stdout + built.stderr
    assert ("downloading" in built.stderr) == (not (cache / "ggml-headers").exists())
    package = next(installed.glob("lib/python*/site-packages/rotary_gguf"))
    library = package / "lib" / "librotary_sched.so"
    assert built.stdout.strip() == f"built {library}"
    assert f"({package / 'native'})" in built.stderr  # the installed copy, not the checkout's native/
    assert library.is_file()
    assert list((cache / "plugin-build").glob("*/CMakeCache.txt"))
    # The CPU stand-in device lets the library load and register without a GPU.
    status = _run(installed, "rotary", "plugin", "status", cwd=tmp_path, ROTARY_CACHE=str(cache),
                  ROTARY_SCHED_DEVICE="cpu")
    assert status.returncode == 0, status.stderr
    assert str(library) in status.stdout
    assert "unavailable" not in status.stdout and "llama-cpp-python 0.3.36" in status.stdout


# scripts/setup_env.sh --which-build: the CPU/CUDA decision alone, with fake nvidia-smi and nvcc.

def _fake_tool(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def _nvidia_smi(folder: Path, gpus: list[tuple[str, str]] | None, compute_cap_field: bool = True) -> None:
    """A fake nvidia-smi listing gpus (name, compute capability); None: no driver (exit 9)."""
    if gpus is None:
        _fake_tool(folder, "nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not communicate with the "
                   "NVIDIA driver.'; exit 9")
        return
    listing = "; ".join(f"echo 'GPU {i}: {name} (UUID: GPU-{i})'" for i, (name, _) in enumerate(gpus))
    caps = ("; ".join(f"echo '{cap}'" for _, cap in gpus) if compute_cap_field
            else "echo 'Field \"compute_cap\" is not a valid field to query.'; exit 2")
    _fake_tool(folder, "nvidia-smi", f'case "$*" in\n  -L) {listing or "exit 6"} ;;\n  *compute_cap*) {caps} ;;\nesac')


def _which_build(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a copy of setup_env.sh (so its `cd` lands in tmp_path) with tmp_path/bin first on PATH."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "setup_env.sh", tmp_path / "scripts" / "setup_env.sh")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("ROTARY_CUDA", "ROTARY_CUDA_ARCH", "CMAKE_CUDA_ARCHITECTURES", "CUDACXX", "ARCH")}
    environ.update(PATH=f"{tmp_path / 'bin'}:{environ['PATH']}", **env)
    return subprocess.run(["bash", str(tmp_path / "scripts" / "setup_env.sh"), "--which-build"], capture_output=True,
                          text=True, env=environ, timeout=60)


@pytest.fixture
def nvcc(tmp_path: Path) -> str:
    return str(_fake_tool(tmp_path / "cuda", "nvcc", "exit 0"))


RTX4060 = ("NVIDIA GeForce RTX 4060 Laptop GPU", "8.9")


@pytest.mark.parametrize(("gpus", "env", "expected", "why"), [
    (None, {}, "cpu", "lists no NVIDIA GPU"),
    ([], {}, "cpu", "lists no NVIDIA GPU"),
    ([RTX4060], {}, "cuda 89", "the compute capability nvidia-smi reports"),
    ([("NVIDIA GeForce RTX 3060", "8.6"), RTX4060], {}, "cuda 86;89", "RTX 3060"),
    ([RTX4060], {"ROTARY_CUDA": "0"}, "cpu", "ROTARY_CUDA=0"),
    ([RTX4060], {"ROTARY_CUDA_ARCH": "8.6"}, "cuda 86", "ROTARY_CUDA_ARCH"),
    ([RTX4060], {"CMAKE_CUDA_ARCHITECTURES": "90"}, "cuda 90", "CMAKE_CUDA_ARCHITECTURES"),
    ([RTX4060], {"CMAKE_CUDA_ARCHITECTURES": "90", "ROTARY_CUDA_ARCH": "89"}, "cuda 89", "ROTARY_CUDA_ARCH"),
    (None, {"ROTARY_CUDA": "1"}, "cuda 89", "RTX 40 laptop GPUs (compute capability 8.9)"),
    (None, {"ROTARY_CUDA": "1", "ROTARY_CUDA_ARCH": "86,89"}, "cuda 86;89", "ROTARY_CUDA_ARCH"),
])
def test_setup_env_chooses_the_llama_cpp_build(tmp_path: Path, nvcc: str, gpus, env, expected, why) -> None:
    _nvidia_smi(tmp_path / "bin", gpus)
    done = _which_build(tmp_path, CUDACXX=nvcc, **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
    assert why in done.stderr
    assert not (tmp_path / ".venv").exists()  # --which-build changes nothing


def test_setup_env_without_nvcc_stays_on_cpu(tmp_path: Path) -> None:
    _nvidia_smi(tmp_path / "bin", [RTX4060])
    done = _which_build(tmp_path, CUDACXX=str(tmp_path / "no-nvcc"))
    assert (done.returncode, done.stdout.strip()) == (0, "cpu")
    assert "no nvcc" in done.stderr
    forced = _which_build(tmp_path, CUDACXX=str(tmp_path / "no-nvcc"), ROTARY_CUDA="1")
    assert forced.returncode == 2 and "ROTARY_CUDA=1 but no nvcc" in forced.stderr


def test_setup_env_old_driver_without_compute_cap_gets_the_default(tmp_path: Path, nvcc: str) -> None:
    _nvidia_smi(tmp_path / "bin", [RTX4060], compute_cap_field=False)
    done = _which_build(tmp_path, CUDACXX=nvcc)
    assert (done.returncode, done.stdout.strip()) == (0, "cuda 89")


@pytest.mark.parametrize(("env", "message"), [
    ({"ROTARY_CUDA": "yes"}, "ROTARY_CUDA=yes: expected 1 (CUDA build) or 0 (CPU build)"),
    ({"ROTARY_CUDA": "1", "ROTARY_CUDA_ARCH": "sm 89!"}, "CUDA architectures 'sm89!' (ROTARY_CUDA_ARCH): expected"),
])
def test_setup_env_refuses_bad_settings(tmp_path: Path, nvcc: str, env: dict[str, str], message: str) -> None:
    _nvidia_smi(tmp_path / "bin", [])
    done = _which_build(tmp_path, CUDACXX=nvcc, **env)
    assert (done.returncode, done.stdout) == (2, "")
    assert message in done.stderr

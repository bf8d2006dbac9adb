"""`rotary plugin build`: compile the scheduler plugin (native/, CMakeLists.txt) for the installed llama.cpp.

The plugin uses ggml's internal backend interface, so it compiles against the ggml headers of exactly the
installed llama-cpp-python version (taken from that version's sdist on the package index, or from a folder
the user names) and links the installed libggml*.so.0. No CUDA compiler is involved: the plugin drives the
GPU only through ggml's backend API.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from rotary_gguf import runtime
from rotary_gguf.cache import cache_dir
from rotary_gguf.plugin import LIBRARY_NAME, PluginError, plugin_path

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout holding CMakeLists.txt and native/
_GGML_IN_SDIST = "vendor/llama.cpp/ggml/"


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise PluginError("llama-cpp-python is not installed; run scripts/setup_env.sh") from None


def fetch_from_sdist(version: str, under: str, keep: Callable[[str], bool], dest: Path, what: str,
                     say: Callable[[str], None]) -> Path:
    """The files below `under` (a folder inside the sdist, like vendor/llama.cpp/ggml/) of the
    llama-cpp-python `version` sdist whose path relative to it passes `keep`, extracted into dest
    (staged beside it and renamed, so an interrupted download leaves no half folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        say(f"downloading the llama-cpp-python {version} sdist for {what}")
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={version}", "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode or not archives:
            reason = (done.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise PluginError(f"cannot download the llama-cpp-python {version} sdist for {what}: {reason}")
        staging = dest.with_name(dest.name + ".part")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                _, _, inner = member.name.partition("/")
                if not (member.isfile() and inner.startswith(under) and keep(inner[len(under):])):
                    continue
                target = staging / inner[len(under):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


def _is_ggml_header(relative: str) -> bool:
    """include/*.h and the top level of src/ (ggml-backend-impl.h, ggml-impl.h)."""
    return relative.endswith(".h") and (relative.startswith("include/")
                                        or relative.count("/") == 1 and relative.startswith("src/"))


def llama_cpp_converter(say: Callable[[str], None] = lambda _: None) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py with conversion/ and gguf-py/, from the installed
    llama-cpp-python's sdist (cached): the reference rotary's converter is checked against."""
    version = llama_cpp_python_version()
    folder = cache_dir() / "llama-cpp-converter" / f"llama-cpp-python-{version}"
    if (folder / "convert_hf_to_gguf.py").exists():
        return folder
    return fetch_from_sdist(version, "vendor/llama.cpp/",
                            lambda rel: rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/")),
                            folder, "llama.cpp's convert_hf_to_gguf.py", say)


def ggml_headers(version: str, ggml_dir: Path | None, say: Callable[[str], None]) -> Path:
    """The ggml folder (include/, src/) to compile against: the given one, the cached one, or a fresh copy."""
    folder = ggml_dir or cache_dir() / "ggml-headers" / f"llama-cpp-python-{version}"
    if (folder / "src" / "ggml-backend-impl.h").exists():
        return folder
    if ggml_dir:
        raise PluginError(f"{ggml_dir}: no src/ggml-backend-impl.h; pass the sdist's vendor/llama.cpp/ggml folder")
    try:
        return fetch_from_sdist(version, _GGML_IN_SDIST, _is_ggml_header, folder, "its ggml headers", say)
    except PluginError as exc:
        raise PluginError(f"{exc}; or pass --ggml-dir <sdist>/vendor/llama.cpp/ggml") from None


def build_plugin(*, ggml_dir: Path | None = None, jobs: int = 2, say: Callable[[str], None] = lambda _: None) -> Path:
    """Configure and build the plugin with CMake; install it where the runtime looks (plugin_path())."""
    if not (SOURCE_ROOT / "CMakeLists.txt").exists() or not (SOURCE_ROOT / "native").is_dir():
        raise PluginError(f"{SOURCE_ROOT}: no CMakeLists.txt and native/ here; build from a source checkout")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise PluginError("cmake is not installed (it builds the scheduler plugin)")
    version = llama_cpp_python_version()
    headers = ggml_headers(version, ggml_dir, say)
    build_dir = SOURCE_ROOT / "build" / "native"
    configure = [cmake, "-S", str(SOURCE_ROOT), "-B", str(build_dir), f"-DROTARY_GGML_DIR={headers}",
                 f"-DROTARY_GGML_LIB_DIR={runtime.library_dir()}", f"-DROTARY_LLAMA_CPP_PYTHON_VERSION={version}"]
    compile_ = [cmake, "--build", str(build_dir), "-j", str(jobs)]
    for step, command in (("configuring", configure), ("compiling", compile_)):
        say(f"{step} the scheduler plugin")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            lines = [line for line in (done.stdout + done.stderr).splitlines() if "rror" in line]
            raise PluginError(f"{step} the plugin failed: {(lines or ['see cmake output'])[0].strip()}")
    target = plugin_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".part")
    shutil.copy2(build_dir / LIBRARY_NAME, staging)
    staging.rename(target)
    return target

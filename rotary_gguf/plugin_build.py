"""`rotary plugin build`: compile the scheduler plugin for the installed llama.cpp.

The plugin's CMake project (native/ in the checkout) installs with the package as rotary_gguf/native, so an
installed rotary builds it without a checkout; the build folder lives in the cache and the library is
installed where rotary_gguf.plugin.plugin_path() looks. The plugin uses ggml's internal backend interface,
so it compiles against the ggml headers of exactly the installed llama-cpp-python version (taken from that
version's sdist on the package index, or from a folder the user names) and links the installed
libggml*.so.0. No CUDA compiler is involved: the plugin drives the GPU only through ggml's backend API.
"""

from __future__ import annotations

import hashlib
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

_PACKAGE = Path(__file__).resolve().parent
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


def native_source() -> Path:
    """The plugin's CMake project: rotary_gguf/native in an installed package, else the checkout's native/
    (where an editable install maps rotary_gguf.native)."""
    candidates = (_PACKAGE / "native", _PACKAGE.parent / "native")
    for folder in candidates:
        if (folder / "CMakeLists.txt").is_file():
            return folder
    raise PluginError(f"no plugin sources: neither {candidates[0]} nor {candidates[1]} holds CMakeLists.txt; "
                      "reinstall rotary-gguf")


def build_folder(source: Path, lib_dir: Path, version: str) -> Path:
    """The CMake build folder in the cache, one per source folder, ggml library folder and version (CMake
    refuses to reuse a build folder for another source folder)."""
    key = hashlib.sha256(f"{source}\0{lib_dir}\0{version}".encode()).hexdigest()[:16]
    return cache_dir() / "plugin-build" / f"llama-cpp-python-{version}-{key}"


def _run_cmake(step: str, command: list[str], log: Path) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    if done.returncode:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "rror" in line]
        raise PluginError(f"{step} the plugin failed: {(lines or ['see the log'])[0].strip()} (full output: {log})")


def _install(built: Path, target: Path) -> Path:
    """Copy the library to target beside it first and rename, so a running rotary never sees half a file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(target.name + ".part")
        shutil.copy2(built, staging)
        staging.rename(target)
    except OSError as exc:
        raise PluginError(f"cannot install the plugin at {target}: {exc.strerror}; set ROTARY_PLUGIN to a "
                          "writable path (e.g. ~/.local/lib/librotary_sched.so) to build and load it there") from None
    return target


def build_plugin(*, ggml_dir: Path | None = None, jobs: int = 2, say: Callable[[str], None] = lambda _: None) -> Path:
    """Configure and build the plugin with CMake in the cache; install it where the runtime looks
    (plugin_path(): $ROTARY_PLUGIN, else rotary_gguf/lib/ in the package)."""
    source = native_source()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise PluginError("cmake is not installed (it builds the scheduler plugin)")
    version = llama_cpp_python_version()
    headers = ggml_headers(version, ggml_dir, say)
    lib_dir = runtime.library_dir()
    build_dir = build_folder(source, lib_dir, version)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "rotary-build.log"
    log.unlink(missing_ok=True)
    configure = [cmake, "-S", str(source), "-B", str(build_dir), f"-DROTARY_GGML_DIR={headers}",
                 f"-DROTARY_GGML_LIB_DIR={lib_dir}", f"-DROTARY_LLAMA_CPP_PYTHON_VERSION={version}"]
    say(f"configuring the scheduler plugin ({source}) in {build_dir}")
    _run_cmake("configuring", configure, log)
    say("compiling the scheduler plugin")
    _run_cmake("compiling", [cmake, "--build", str(build_dir), "-j", str(jobs)], log)
    return _install(build_dir / LIBRARY_NAME, plugin_path())

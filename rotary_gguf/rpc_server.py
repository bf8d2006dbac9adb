"""`rotary rpc-server`: llama.cpp's own rpc-server (tools/rpc/rpc-server.cpp and ggml/src/ggml-rpc of the
pinned llama-cpp-python sdist), compiled once into the rotary cache against the installed llama-cpp-python's
libggml*.so.0 - so it computes with exactly the client's ggml, and exposes a GPU when that build has one -
with a small front end (below) that adds --mem: the memory the server's CPU device reports.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from rotary_gguf.cache import cache_dir
from rotary_gguf.errors import RotaryError
from rotary_gguf.plugin_build import fetch_from_sdist, ggml_headers, llama_cpp_python_version

BINARY = "rotary-rpc-server"
LOOPBACK = ("127.0.0.1", "localhost")
_RPC_SOURCES = ("ggml/src/ggml-rpc/ggml-rpc.cpp", "ggml/src/ggml-rpc/transport.cpp", "ggml/src/ggml-rpc/transport.h",
                "tools/rpc/rpc-server.cpp")
# The front end: `--mem BYTES` registers a device that wraps the CPU device and reports BYTES as its free and
# total memory (what the RPC server answers a client's get_device_memory with, and what rotary's planner
# places against; allocations are not limited), then runs llama.cpp's main (compiled as
# llama_rpc_server_main) on it with `-d CPU-MEM`. Without --mem it is llama.cpp's rpc-server unchanged.
_FRONT_END = r"""
#include "ggml-backend.h"
#include "ggml-backend-impl.h"
#include "ggml-rpc.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

int llama_rpc_server_main(int argc, char ** argv);

static ggml_backend_dev_t cpu_device = nullptr;
static ggml_backend_device limited_device;
static size_t limit_bytes = 0;

static const char * limited_name(ggml_backend_dev_t) { return "CPU-MEM"; }

static void limited_memory(ggml_backend_dev_t, size_t * free, size_t * total) {
    *free = limit_bytes;
    *total = limit_bytes;
}

static void limited_props(ggml_backend_dev_t dev, ggml_backend_dev_props * props) {
    cpu_device->iface.get_props(cpu_device, props);
    props->name = limited_name(dev);
    props->memory_free = props->memory_total = limit_bytes;
}

static ggml_backend_t limited_init(ggml_backend_dev_t dev, const char * params) {
    ggml_backend_t backend = cpu_device->iface.init_backend(cpu_device, params);
    if (backend) {
        backend->device = dev;  // the server asks the backend's device for its memory
    }
    return backend;
}

int main(int argc, char ** argv) {
    if (!ggml_backend_reg_by_name("RPC")) {
        ggml_backend_register(ggml_backend_rpc_reg());  // a llama.cpp built without GGML_RPC
    }
    std::vector<char *> args;
    for (int i = 0; i < argc; i++) {
        if (std::strcmp(argv[i], "--mem") == 0 && i + 1 < argc) {
            limit_bytes = std::strtoull(argv[++i], nullptr, 10);
        } else {
            args.push_back(argv[i]);
        }
    }
    static char device_flag[] = "-d", device_name[] = "CPU-MEM";
    if (limit_bytes > 0) {
        cpu_device = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!cpu_device) {
            fprintf(stderr, "no CPU device\n");
            return 1;
        }
        limited_device = *cpu_device;
        limited_device.iface.get_name = limited_name;
        limited_device.iface.get_memory = limited_memory;
        limited_device.iface.get_props = limited_props;
        limited_device.iface.init_backend = limited_init;
        ggml_backend_device_register(&limited_device);
        args.push_back(device_flag);
        args.push_back(device_name);
    }
    args.push_back(nullptr);
    return llama_rpc_server_main((int)args.size() - 1, args.data());
}
"""


class RpcServerError(RotaryError):
    """llama.cpp's rpc-server cannot be built or started."""


def _sources(version: str, say: Callable[[str], None]) -> Path:
    folder = cache_dir() / "rpc-server-src" / f"llama-cpp-python-{version}"
    if all((folder / name).is_file() for name in _RPC_SOURCES):
        return folder
    try:
        return fetch_from_sdist(version, "vendor/llama.cpp/", lambda rel: rel in _RPC_SOURCES, folder,
                                "llama.cpp's rpc-server", say)
    except RotaryError as exc:
        raise RpcServerError(str(exc)) from None


def _compile(compiler: str, source: Path, out: Path, flags: list[str]) -> str | None:
    done = subprocess.run([compiler, *flags, "-c", str(source), "-o", str(out)], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    return f"{source.name}: {(errors or done.stderr.splitlines() or ['failed'])[0].strip()}"


def build_rpc_server(jobs: int = 2, say: Callable[[str], None] = lambda _: None) -> Path:
    """The rpc-server binary for the installed llama-cpp-python, compiled on first use into the rotary cache,
    keyed by the version, the ggml libraries (folder and build time) and the front end. It links that build's
    libggml-rpc.so.0 when there is one (two files to compile, ~15 s on 2 cores), else compiles ggml-rpc in."""
    from rotary_gguf import runtime

    version = llama_cpp_python_version()
    lib_dir = runtime.library_dir()
    linked_rpc = (lib_dir / "libggml-rpc.so.0").exists()
    stamp = (lib_dir / "libggml.so.0").stat().st_mtime_ns if (lib_dir / "libggml.so.0").exists() else 0
    key = hashlib.sha256(f"{version}\0{lib_dir}\0{stamp}\0{linked_rpc}\0{_FRONT_END}".encode()).hexdigest()[:16]
    folder = cache_dir() / "rpc-server" / f"llama-cpp-python-{version}-{key}"
    binary = folder / BINARY
    if binary.is_file():
        return binary
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RpcServerError("no C++ compiler (c++, g++ or $CXX) to build llama.cpp's rpc-server")
    headers, sources = ggml_headers(version, None, say), _sources(version, say)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "front_end.cpp").write_text(_FRONT_END)
    flags = ["-O2", "-std=c++17", "-DNDEBUG", "-pthread", f"-I{headers / 'include'}", f"-I{headers / 'src'}",
             f"-I{sources / 'ggml/src/ggml-rpc'}"]
    units = [(sources / "tools/rpc/rpc-server.cpp", [*flags, "-Dmain=llama_rpc_server_main"]),
             (folder / "front_end.cpp", flags)]
    if not linked_rpc:
        units += [(sources / "ggml/src/ggml-rpc" / name, flags) for name in ("ggml-rpc.cpp", "transport.cpp")]
    say(f"compiling llama.cpp's rpc-server (llama-cpp-python {version}) in {folder}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        failures = [f for f in pool.map(lambda u: _compile(compiler, u[0], folder / f"{u[0].stem}.o", u[1]), units)
                    if f]
    if failures:
        raise RpcServerError(f"compiling llama.cpp's rpc-server failed: {failures[0]}")
    staging = folder / f"{BINARY}.part"
    libraries = (["-l:libggml-rpc.so.0"] if linked_rpc else []) + ["-l:libggml.so.0", "-l:libggml-base.so.0"]
    link = [compiler, *(str(folder / f"{source.stem}.o") for source, _ in units), "-o", str(staging),
            f"-L{lib_dir}", *libraries, f"-Wl,-rpath,{lib_dir}", "-pthread"]
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise RpcServerError(f"linking llama.cpp's rpc-server failed: {reason}")
    staging.rename(binary)
    return binary


def server_command(binary: Path, host: str, port: int, threads: int, mem: int | None,
                   tensor_cache: Path | None) -> tuple[list[str], dict[str, str]]:
    """The rpc-server command line and environment (llama.cpp's -c keeps tensors it received in
    $LLAMA_CACHE/rpc, so a client resends a large tensor as its hash; OpenMP threads sleep between graphs
    unless OMP_WAIT_POLICY says otherwise)."""
    command = [str(binary), "-H", host, "-p", str(port), "-t", str(threads)]
    # Between graphs the CPU backend's OpenMP threads would spin for the next one; sharing cores with the
    # client (loopback) that starved it: 0.6 tok/s instead of 169 on the 2-core VM (docs/rpc.md).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    if mem:
        command += ["--mem", str(mem)]
    if tensor_cache is not None:
        command.append("-c")
        env["LLAMA_CACHE"] = str(tensor_cache)
    return command, env


def exposure_warning(host: str) -> str | None:
    """The loud warning for a server bound beyond this machine, or None on loopback."""
    if host in LOOPBACK:
        return None
    return (f"WARNING: rpc-server listening on {host}: llama.cpp's RPC protocol has no authentication and no\n"
            "encryption - anyone who can reach this port can allocate memory, read and write tensors and run\n"
            "graphs on this machine. Bind 127.0.0.1 and reach it through an SSH tunnel instead\n"
            f"(ssh -N -L 50052:127.0.0.1:50052 user@this-host; docs/rpc.md).")

#!/usr/bin/env bash
# Create the project's virtualenv at .venv (when missing), install rotary-gguf with its test extras, and
# build the scheduler plugin against the installed llama.cpp. Later runs reuse .venv.
#
# llama-cpp-python==0.3.36 compiles from source on first install, as one of two builds:
#   CPU   the default: about 8 minutes on 2 cores; pip caches the wheel.
#   CUDA  when nvidia-smi lists an NVIDIA GPU and nvcc is found, or with ROTARY_CUDA=1: built with
#         -DGGML_CUDA=on, never from pip's wheel cache (it would hand back the cached CPU wheel of the same
#         version), and only when .venv has no CUDA build for the wanted architectures yet (libggml-cuda in
#         llama_cpp/lib). Tens of minutes on a laptop.
# Environment:
#   ROTARY_CUDA=1|0          force the CUDA or the CPU build (unset: detect as above)
#   ROTARY_CUDA_ARCH=89      compute capabilities to compile for, CMake style ("89", "86;89"; "8.9" works);
#                            else CMAKE_CUDA_ARCHITECTURES; else the detected GPU's (nvidia-smi
#                            --query-gpu=compute_cap); else 89 (RTX 40 laptop GPUs)
#   CUDACXX                  the nvcc to use (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
#   ROTARY_RPC=1|0           llama.cpp's RPC backend in either build (-DGGML_RPC=ON; default 1): `--rpc` places
#                            layers on other hosts (docs/rpc.md). It adds libggml-rpc (~30 s of the compile) and
#                            costs nothing at run time unless --rpc is given. A .venv build without it is
#                            rebuilt once (a cached wheel would come back without it).
#   PYTHON                   the interpreter that creates .venv (default python3)
# `bash scripts/setup_env.sh --which-build` prints the choice ("cpu" or "cuda ARCHS"), says why on stderr,
# and changes nothing. `--with-browser` (scripts/test.sh) also installs Debian's chromium and chromium-driver
# when they are missing and this runs as root, for the server page's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON=llama-cpp-python==0.3.36
CUDA_MARKER=.venv/rotary-llama-cuda-arch  # the architectures of a CUDA build made by this script
ARCH="" ARCH_WHY=""

find_nvcc() {  # the nvcc to build with, or nothing
    if [ -n "${CUDACXX:-}" ]; then
        if [ -x "$CUDACXX" ]; then echo "$CUDACXX"; fi
    elif command -v nvcc; then
        :
    elif [ -x /usr/local/cuda/bin/nvcc ]; then
        echo /usr/local/cuda/bin/nvcc
    fi
}

gpu_name() {  # the first GPU `nvidia-smi -L` lists ("GPU 0: NAME (UUID: ...)"), or nothing
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | sed -n 's/^GPU [0-9]*: \(.*\) (UUID.*$/\1/p; s/^GPU [0-9]*: \([^(]*\)$/\1/p' \
            | head -n 1 || true
    fi
}

choose_arch() {  # sets ARCH and ARCH_WHY
    local detected=""
    if [ -n "${ROTARY_CUDA_ARCH:-}" ]; then
        ARCH=$ROTARY_CUDA_ARCH ARCH_WHY="ROTARY_CUDA_ARCH"
    elif [ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]; then
        ARCH=$CMAKE_CUDA_ARCHITECTURES ARCH_WHY="CMAKE_CUDA_ARCHITECTURES"
    else
        if command -v nvidia-smi >/dev/null 2>&1; then
            detected=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
                | tr -d ' .' | grep -E '^[0-9]+$' | sort -u | paste -sd ';' || true)
        fi
        if [ -n "$detected" ]; then
            ARCH=$detected ARCH_WHY="the compute capability nvidia-smi reports"
        else
            ARCH=89 ARCH_WHY="no GPU to ask: the default, RTX 40 laptop GPUs (compute capability 8.9)"
        fi
    fi
    ARCH=$(echo "$ARCH" | tr -d ' .' | tr ',' ';')
    if ! [[ $ARCH =~ ^[0-9a-z-]+(\;[0-9a-z-]+)*$ ]]; then
        echo "CUDA architectures '$ARCH' ($ARCH_WHY): expected compute capabilities such as 89 or 86;89" >&2
        return 2
    fi
}

choose_build() {  # sets BUILD (cpu or cuda), WHY, NVCC, and for cuda ARCH and ARCH_WHY
    local gpu
    NVCC=$(find_nvcc)
    gpu=$(gpu_name)
    case "${ROTARY_CUDA:-}" in
        0) BUILD=cpu WHY="ROTARY_CUDA=0" ;;
        1)
            if [ -z "$NVCC" ]; then
                echo "ROTARY_CUDA=1 but no nvcc found (PATH, /usr/local/cuda/bin, CUDACXX): install the CUDA" \
                     "toolkit, or set CUDACXX to its nvcc" >&2
                return 2
            fi
            BUILD=cuda WHY="ROTARY_CUDA=1" ;;
        "")
            if [ -z "$gpu" ]; then
                BUILD=cpu WHY="nvidia-smi lists no NVIDIA GPU; ROTARY_CUDA=1 forces a CUDA build"
            elif [ -z "$NVCC" ]; then
                BUILD=cpu WHY="nvidia-smi lists $gpu but no nvcc was found: install the CUDA toolkit (or set CUDACXX) for a CUDA build"
            else
                BUILD=cuda WHY="nvidia-smi lists $gpu and nvcc is $NVCC; ROTARY_CUDA=0 forces the CPU build"
            fi ;;
        *)
            echo "ROTARY_CUDA=$ROTARY_CUDA: expected 1 (CUDA build) or 0 (CPU build), or unset to detect" >&2
            return 2 ;;
    esac
    if [ "$BUILD" = cuda ]; then choose_arch; fi
}

llama_lib_dir() {  # .venv's llama_cpp/lib, found without importing llama_cpp (that would load libllama)
    .venv/bin/python -c 'import importlib.util as u; s = u.find_spec("llama_cpp")
print(s.submodule_search_locations[0] + "/lib" if s and s.submodule_search_locations else "")' 2>/dev/null || true
}

has_rpc_llama() {
    local lib
    lib=$(llama_lib_dir)
    [ -n "$lib" ] && compgen -G "$lib/libggml-rpc.so*" >/dev/null
}

choose_rpc() {  # sets RPC (on or off)
    case "${ROTARY_RPC:-1}" in
        1) RPC=on ;;
        0) RPC=off ;;
        *) echo "ROTARY_RPC=$ROTARY_RPC: expected 1 (llama.cpp's RPC backend, the default) or 0" >&2
           return 2 ;;
    esac
}

install_rpc_llama() {  # the RPC backend in .venv's llama-cpp-python (CPU build; a CUDA build is kept as it is)
    if [ "$RPC" = off ] || has_rpc_llama; then
        return 0
    fi
    if [ "$BUILD" = cuda ]; then
        echo "keeping .venv's CUDA build of llama-cpp-python, which has no RPC backend (--rpc is unavailable;" \
             "uninstall llama-cpp-python and run this again to rebuild it with both)" >&2
        return 0
    fi
    echo "rebuilding llama-cpp-python with llama.cpp's RPC backend (-DGGML_RPC=ON; .venv's build has none):" \
         "~8 minutes, once" >&2
    .venv/bin/python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$LLAMA_CPP_PYTHON"
    if ! has_rpc_llama; then
        echo "the rebuilt llama-cpp-python has no libggml-rpc in $(llama_lib_dir)" >&2
        return 1
    fi
}

has_cuda_llama() {
    local lib
    lib=$(llama_lib_dir)
    [ -n "$lib" ] && compgen -G "$lib/libggml-cuda.so*" >/dev/null
}

install_cuda_llama() {  # a CUDA build of llama-cpp-python for $ARCH, unless .venv has one already
    if has_cuda_llama; then
        if [ ! -f "$CUDA_MARKER" ]; then
            echo "keeping .venv's CUDA build of llama-cpp-python (not made by this script: architectures" \
                 "unknown; uninstall llama-cpp-python to rebuild for $ARCH)" >&2
            return 0
        elif [ "$(cat "$CUDA_MARKER")" = "$ARCH" ]; then
            echo "keeping .venv's CUDA build of llama-cpp-python (architectures $ARCH)" >&2
            return 0
        fi
        echo "rebuilding llama-cpp-python: .venv's CUDA build is for $(cat "$CUDA_MARKER"), $ARCH wanted" >&2
    fi
    echo "building $LLAMA_CPP_PYTHON with CUDA for architectures $ARCH ($ARCH_WHY) with $NVCC:" \
         "tens of minutes" >&2
    rm -f "$CUDA_MARKER"
    CUDACXX=$NVCC CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH ${CMAKE_ARGS:-}" \
        .venv/bin/python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$LLAMA_CPP_PYTHON"
    if ! has_cuda_llama; then
        echo "the CUDA build of llama-cpp-python has no libggml-cuda in $(llama_lib_dir)" >&2
        return 1
    fi
    echo "$ARCH" >"$CUDA_MARKER"
}

install_cpu_llama() {  # back to the CPU build when .venv has a CUDA one (ROTARY_CUDA=0 only)
    echo "replacing .venv's CUDA build of llama-cpp-python with the CPU build (ROTARY_CUDA=0)" >&2
    rm -f "$CUDA_MARKER"
    CMAKE_ARGS="-DGGML_CUDA=off ${CMAKE_ARGS:-}" \
        .venv/bin/python -m pip install --quiet --force-reinstall --no-deps "$LLAMA_CPP_PYTHON"
    if has_cuda_llama; then  # pip's cache held a CUDA wheel of this version: build it afresh
        CMAKE_ARGS="-DGGML_CUDA=off ${CMAKE_ARGS:-}" .venv/bin/python -m pip install --quiet --no-cache-dir \
            --force-reinstall --no-deps "$LLAMA_CPP_PYTHON"
    fi
}

install_chromium() {  # headless Chromium for tests/test_server_browser.py, from Debian's packages (as root)
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "no chromium and chromedriver: tests/test_server_browser.py will skip (as root, with apt-get, this" \
             "script installs them)" >&2
        return 0
    fi
    echo "installing chromium and chromium-driver with apt-get (for tests/test_server_browser.py)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
            >/dev/null; }; then
        echo "apt-get could not install chromium: tests/test_server_browser.py will skip" >&2
    fi
}

choose_build
choose_rpc
if [ "${1:-}" = "--which-build" ]; then
    echo "llama-cpp-python: $BUILD build ($WHY)${ARCH:+; architectures $ARCH ($ARCH_WHY)}; RPC backend $RPC" \
         "(ROTARY_RPC)" >&2
    echo "$BUILD${ARCH:+ $ARCH}"
    exit 0
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "rotary-gguf needs Python >= 3.10 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if [ "$RPC" = on ]; then
    export CMAKE_ARGS="-DGGML_RPC=ON ${CMAKE_ARGS:-}"
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "llama-cpp-python: $BUILD build ($WHY)" >&2
if [ "$BUILD" = cuda ]; then
    install_cuda_llama
elif [ "${ROTARY_CUDA:-}" = 0 ] && has_cuda_llama; then
    install_cpu_llama
fi
echo "installing rotary-gguf into .venv (a CPU llama-cpp-python builds from source the first time: ~8 min)" >&2
.venv/bin/python -m pip install --quiet -e '.[test]'
install_rpc_llama
echo "building the rotary scheduler plugin (native/) against the installed llama.cpp" >&2
.venv/bin/rotary plugin build
if [ "${1:-}" = "--with-browser" ]; then  # scripts/test.sh: the server page's test in a real browser
    install_chromium
fi

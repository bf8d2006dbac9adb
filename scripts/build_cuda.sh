#!/usr/bin/env bash
# Build the pinned llama.cpp (vendored in the llama-cpp-python 0.3.36 sdist) with CUDA on a machine that
# has nvcc but no GPU, no cuBLAS and no driver, and pack the shared libraries for a GPU machine:
#
#     bash scripts/build_cuda.sh            # sm_90 (H100/H200); CUDA_ARCHS="90;89" adds RTX 40 laptops
#
# Output: build/cuda/lib/*.so* and build/cuda-bundle.tar.xz (stripped; travels in the device tool's
# 64 MiB carry limit). On the GPU machine: unpack, put the image's cuBLAS on LD_LIBRARY_PATH and point
# LLAMA_CPP_LIB_PATH at the lib folder; llama-cpp-python and rotary then run on the GPU unchanged.
# How the toolkit is assembled (cuBLAS from the nvidia-cublas wheel, an overlay CUDAToolkit_ROOT,
# no VMM because libcuda.so is absent) is explained in ARCHITECTURE.md section 5.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHS=${CUDA_ARCHS:-90}
WORK=build/cuda-work
OUT=build/cuda
PYTHON=${PYTHON:-.venv/bin/python}
NVCC=$(command -v nvcc) || { echo "build_cuda.sh: nvcc not found" >&2; exit 2; }
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
mkdir -p "$WORK" "$OUT/lib"
started=$(date +%s)

# 1. The llama.cpp sources of the pinned llama-cpp-python.
SRC=$WORK/llama_cpp_python-0.3.36/vendor/llama.cpp
if [ ! -d "$SRC" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$WORK"
    tar -xzf "$WORK"/llama_cpp_python-0.3.36.tar.gz -C "$WORK"
fi

# 2. cuBLAS headers and libraries from the nvidia-cublas wheel (the toolkit here ships neither).
CUBLAS=$WORK/cublas
if [ ! -d "$CUBLAS/nvidia" ]; then
    "$PYTHON" -m pip download --quiet --no-deps nvidia-cublas -d "$WORK"
    mkdir -p "$CUBLAS"
    "$PYTHON" -m zipfile -e "$WORK"/nvidia_cublas-*.whl "$CUBLAS"
fi
CUBLAS_DIR=$(readlink -f "$(dirname "$(find "$CUBLAS" -name 'libcublas.so.*' | head -n 1)")")
CUBLAS_INC=$(readlink -f "$(dirname "$(find "$CUBLAS" -name 'cublas_v2.h' | head -n 1)")")

# 3. A toolkit root that CMake's FindCUDAToolkit accepts: the installed toolkit plus cuBLAS.
ROOT=$WORK/toolkit
rm -rf "$ROOT" && mkdir -p "$ROOT/include" "$ROOT/lib64"
for d in bin nvvm targets; do ln -s "$CUDA_HOME/$d" "$ROOT/$d"; done
ln -s "$CUDA_HOME"/include/* "$ROOT/include/"
ln -s "$CUDA_HOME"/lib64/* "$ROOT/lib64/"
ln -sf "$CUBLAS_INC"/* "$ROOT/include/"
for lib in "$CUBLAS_DIR"/lib*.so.*; do
    ln -sf "$lib" "$ROOT/lib64/"
    base=$(basename "$lib"); ln -sf "$lib" "$ROOT/lib64/${base%%.so.*}.so"
done

# 4. Configure and build the libraries only.
# FindCUDAToolkit resolves the toolkit from nvcc's real location, so cuBLAS is also named directly.
ROOT_ABS=$(cd "$ROOT" && pwd)
rm -rf "$WORK/build"
CUDACXX="$ROOT_ABS/bin/nvcc" cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCUDAToolkit_ROOT="$ROOT_ABS" \
    -DCUDA_cublas_LIBRARY="$ROOT_ABS/lib64/libcublas.so" -DCUDA_cublasLt_LIBRARY="$ROOT_ABS/lib64/libcublasLt.so" \
    -DCMAKE_CUDA_FLAGS="-I$ROOT_ABS/include" -DCMAKE_CXX_FLAGS="-I$ROOT_ABS/include" \
    -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_MTMD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' > "$WORK/configure.log"
cmake --build "$WORK/build" --parallel "$(nproc)" --target llama ggml-cuda

# 5. Collect, strip and pack: the .so.0 files (what libllama links) plus the names loaders ask for.
rm -f "$OUT"/lib/*
for lib in libllama libggml libggml-base libggml-cpu libggml-cuda; do
    real=$(find "$WORK/build" -name "$lib.so.0.*" -type f | head -n 1)
    [ -n "$real" ] || { echo "build_cuda.sh: $lib was not built" >&2; exit 1; }
    cp "$real" "$OUT/lib/$lib.so.0"
    strip --strip-unneeded "$OUT/lib/$lib.so.0"
    ln -sf "$lib.so.0" "$OUT/lib/$lib.so"
done
tar -C "$OUT" -cJf build/cuda-bundle.tar.xz lib
echo "built llama.cpp with CUDA (sm_$ARCHS) in $(( $(date +%s) - started )) s:" \
     "$(du -h build/cuda-bundle.tar.xz | cut -f1) bundle in build/cuda-bundle.tar.xz"

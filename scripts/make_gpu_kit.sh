#!/usr/bin/env bash
# Assemble build/gpu-kit: what scripts/gpu_bench.sh needs on a bare GPU machine with no network, small
# enough for the device tool's 64 MiB carry limit (carry: build/gpu-kit):
#   cuda-bundle.tar.xz   the CUDA build of the pinned llama.cpp (scripts/build_cuda.sh, ~40 min, once)
#   librotary_sched.so   the scheduler plugin (links libggml*.so.0 by name: the CUDA build's copies load)
#   llama_cpp/           llama-cpp-python's Python package without its CPU libraries
#   wheels/              rotary's other dependencies for CPython 3.10-3.12 (numpy comes from the image)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=build/gpu-kit
PY=.venv/bin/python
[ -f build/cuda-bundle.tar.xz ] || { echo "make_gpu_kit.sh: run scripts/build_cuda.sh first" >&2; exit 2; }
rm -rf "$KIT" && mkdir -p "$KIT/wheels"
cp build/cuda-bundle.tar.xz "$KIT/"
.venv/bin/rotary plugin build >/dev/null 2>&1
cp rotary_gguf/lib/librotary_sched.so "$KIT/"
SITE=$($PY -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))")
$PY - "$SITE" "$KIT/llama_cpp" <<'PY'
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns("lib", "__pycache__"))
PY
PURE="gguf==0.19.0 click jinja2 diskcache typing_extensions nvidia-ml-py psutil tqdm"
$PY -m pip download --quiet --no-deps --only-binary :all: -d "$KIT/wheels" $PURE
for version in 3.10 3.11 3.12; do
    $PY -m pip download --quiet --no-deps --only-binary :all: --python-version "$version" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$KIT/wheels" pyyaml markupsafe
done
du -sh "$KIT" | sed 's/^/gpu kit: /'

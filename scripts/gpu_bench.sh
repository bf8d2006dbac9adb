#!/usr/bin/env bash
# The headline benchmark (benchmarks/headline.py), prepared for the GPU machine or run here on the CPU.
#
#   bash scripts/gpu_bench.sh --cpu   # this machine: `small` synth model, CPU stand-in slots, .venv
#   bash scripts/gpu_bench.sh         # GPU machine (run from the repository root with build/gpu-kit
#                                     # carried, see scripts/make_gpu_kit.sh): qwen3-30b-a3b synth at
#                                     # Q4_K, 6.5 GiB budget, 8 threads, ctx 4096, 512 + 256 tokens
#
# Writes $OUT/headline.json and $OUT/headline.md ($OUT defaults to build/gpu-bench). To check the kit
# on a machine without a GPU: GPU_BENCH_PRESET=small ROTARY_SCHED_DEVICE=cpu bash scripts/gpu_bench.sh
# (the CUDA libraries then run on the CPU; the small model's settings are those of --cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-bench}
mkdir -p "$OUT"

if [ "${1:-}" = "--cpu" ]; then
    export ROTARY_SCHED_DEVICE=cpu ROTARY_CACHE=${ROTARY_CACHE:-$PWD/build/gpu-bench-cache}
    PY=.venv/bin/python
    MODEL=$($PY -c "from rotary_gguf.demo import cached_synth_model; print(cached_synth_model('small')[0])")
    $PY -m rotary_gguf trace synth "$OUT/replay.rtrc" --layers 12 --experts 32 --used 4 --requests 2 \
        --decode-tokens 256 --force
    exec $PY benchmarks/headline.py --model "$MODEL" --budget 500MiB --threads 2 --ctx 1024 \
        --prompt-tokens 128 --tokens 64 --trace "$OUT/replay.rtrc" --out "$OUT"
fi

KIT=$PWD/build/gpu-kit
[ -d "$KIT" ] || { echo "gpu_bench.sh: no build/gpu-kit (scripts/make_gpu_kit.sh, then carry it)" >&2; exit 2; }
started=$(date +%s)
mkdir -p /tmp/rotary-kit/cuda
tar -xJf "$KIT/cuda-bundle.tar.xz" -C /tmp/rotary-kit/cuda
python3 -m venv --system-site-packages /tmp/rotary-kit/venv
PY=/tmp/rotary-kit/venv/bin/python
$PY -m pip install --quiet --no-index --find-links "$KIT/wheels" gguf click jinja2 diskcache typing_extensions \
    nvidia-ml-py psutil tqdm pyyaml markupsafe
# cuBLAS and the CUDA runtime come from the image's own nvidia Python packages.
NVLIBS=$($PY - <<'PY'
import glob, os, sys
dirs = {os.path.dirname(p) for d in sys.path for p in glob.glob(os.path.join(d, "nvidia", "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LLAMA_CPP_LIB_PATH=$(dirname "$(find /tmp/rotary-kit/cuda -name 'libllama.so*' | head -1)")
# The bundle's libraries find each other through LD_LIBRARY_PATH (bundles built before build_cuda.sh set
# RUNPATH to $ORIGIN carry the build machine's folder instead).
export LD_LIBRARY_PATH=$LLAMA_CPP_LIB_PATH:${NVLIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$KIT:$PWD ROTARY_PLUGIN=$KIT/librotary_sched.so ROTARY_CACHE=/tmp/rotary-kit/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt" ||
    echo "no nvidia-smi" | tee "$OUT/device.txt"
grep -m1 "model name" /proc/cpuinfo | tee -a "$OUT/device.txt"
$PY -m rotary_gguf plugin status | tee -a "$OUT/device.txt"
echo "setup $(( $(date +%s) - started )) s" >&2
PRESET=${GPU_BENCH_PRESET:-qwen3-30b-a3b}
if [ "$PRESET" = small ]; then
    SETTINGS=(--budget 500MiB --threads 2 --ctx 1024 --prompt-tokens 128 --tokens 64)
    TRACE_SHAPE=(--layers 12 --experts 32 --used 4 --requests 2)
else
    SETTINGS=(--budget 6.5GiB --threads 8 --ctx 4096 --prompt-tokens 512 --tokens 256)
    TRACE_SHAPE=()
fi
$PY -m rotary_gguf synth "/tmp/rotary-kit/$PRESET.gguf" --preset "$PRESET" --type q4_k --force
echo "model ready at $(( $(date +%s) - started )) s" >&2
$PY -m rotary_gguf trace synth "$OUT/replay.rtrc" "${TRACE_SHAPE[@]}" --force
$PY benchmarks/headline.py --model "/tmp/rotary-kit/$PRESET.gguf" "${SETTINGS[@]}" --trace "$OUT/replay.rtrc" \
    --out "$OUT"
echo "done at $(( $(date +%s) - started )) s" >&2

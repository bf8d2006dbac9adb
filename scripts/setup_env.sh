#!/usr/bin/env bash
# Create the project's virtualenv at .venv (when missing) and install rotary-gguf with its test extras.
# llama-cpp-python is compiled from source on first install (about 8 minutes on 2 cores); pip caches
# the wheel, and later runs reuse .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

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
.venv/bin/python -m pip install --quiet --upgrade pip
echo "installing rotary-gguf into .venv (llama-cpp-python builds from source the first time: ~8 min)" >&2
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "building the rotary scheduler plugin (native/) against the installed llama.cpp" >&2
.venv/bin/rotary plugin build

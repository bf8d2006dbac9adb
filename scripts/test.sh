#!/usr/bin/env bash
# Set up .venv and run the test suite (ruff, then pytest on the real llama.cpp CPU build).
# Exits non-zero when a check fails, and when pytest collects no tests at all.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --with-browser || exit $?
.venv/bin/ruff check rotary_gguf tests scripts benchmarks || exit $?
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"

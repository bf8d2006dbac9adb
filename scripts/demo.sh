#!/usr/bin/env bash
# Set up .venv and run the embedded default job: synthesize a MoE GGUF into the cache
# (~/.cache/rotary-gguf, or $ROTARY_CACHE), inspect it and generate tokens through llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/rotary demo "$@"

#!/usr/bin/env bash
# The first checks of the rotary plugin's GPU path (issue 17), in order, each with its expected result,
# written to one report (default benchmarks/gpu-first-checks-<date>.md):
#   1 split assignment: GGML_CUDA_DISABLE_GRAPHS=1 GGML_SCHED_DEBUG=1, a 16- and a 128-token prompt; the
#     plugin computes splits and every logit is finite
#   2 rotation: CUDA graphs on, a copy budget that forces rotation, 1,024 tokens, three times; experts are
#     admitted or prefetched, no error, no device call on the copier's thread (prefetch waits reported)
#   3 decode tok/s: experts-on-host, rotary with 0 slots, rotary with all slots (nsys statistics if present)
#   4 prompt routing: a 512-token prompt (left to llama.cpp above 32 tokens) is counted in every layer
#   5 copier: its measured GB/s and copy stalls at n_threads = cores and cores - 1
#
#   bash scripts/gpu_first_checks.sh [--model GGUF] [--report FILE]   # a GPU machine: ~10 minutes
#   bash scripts/gpu_first_checks.sh --cpu [--report FILE]             # here: CPU stand-in, small model
#
# ROTARY_PYTHON names the interpreter (default .venv/bin/python; on the GPU machine the kit's venv of
# scripts/gpu_bench.sh). Exit status 1 when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
REPORT=benchmarks/gpu-first-checks-$(date +%Y%m%d-%H%M).md
MODEL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --report) REPORT=$2; shift ;;
        --model) MODEL=$2; shift ;;
        *) echo "gpu_first_checks.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY=${ROTARY_PYTHON:-.venv/bin/python}
if [ "$MODE" = cpu ]; then
    export ROTARY_SCHED_DEVICE=cpu
fi
if [ -z "$MODEL" ]; then
    PRESET=$([ "$MODE" = cpu ] && echo small || echo qwen3-30b-a3b)
    MODEL=$($PY -c "from rotary_gguf.demo import cached_synth_model; print(cached_synth_model('$PRESET')[0])") || exit 2
fi
mkdir -p "$(dirname "$REPORT")"
{
    echo "# First GPU checks ($MODE mode)"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ); model $MODEL; $($PY -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)')"
    echo
} > "$REPORT"

# One check in a process of its own (the environment variables are read at start-up); prints one line.
read -r -d '' CHECK <<'PY'
import os, sys, time
from dataclasses import replace
import numpy as np
from rotary_gguf.gguf import open_index
from rotary_gguf.runtime import Engine, EngineOptions, prepare

check, mode, model = sys.argv[1], sys.argv[2], sys.argv[3]
cpu = mode == "cpu"
profile = "rtx4060-laptop-8gb"
budget = (500 if cpu else 6656) * 2**20
cores = os.cpu_count() or 2
index = open_index(model)
slot_bytes = index.slot_bytes(index.moe_layers[0])  # one expert: a budget of a few forces rotation
quarter = max(1, index.params.n_expert // 4)  # slots per layer where rotation must run

def open_engine(placement, slots=None, threads=None, **fields):
    options = EngineOptions(ctx=1024 if cpu else 4096, threads=threads or (2 if cpu else 8), vram_budget=budget,
                            **fields)
    setup = prepare(model, profile, placement, options, runnable=False)
    if slots is not None:
        n = lambda layer: setup.index.params.n_expert if slots == "all" else slots
        setup = replace(setup, placement=replace(setup.placement, expert_slots=tuple(
            (layer, n(layer)) for layer, _ in setup.placement.expert_slots)))
    return Engine.from_setup(setup)

def prompt(n):
    return [10 + i % 200 for i in range(n)]

def result(ok, text):
    print(("PASS " if ok else "FAIL ") + text)
    sys.exit(0 if ok else 1)

if check == "1":
    lines = []
    with open_engine("rotary") as e:
        for n in (16, 128):
            e.evaluate(prompt(n))
            finite = bool(np.all(np.isfinite(e.logits())))
            e.evaluate([int(np.argmax(e.logits()))], append=True)
            s = e.rotation.plugin.stats()
            lines.append(f"{n} tokens: finite {finite}, plugin graph calls {s.graph_calls}")
            if not finite or s.graph_calls == 0:
                result(False, "; ".join(lines))
    result(True, "; ".join(lines))
elif check == "2":
    n_tokens = 32 if cpu else 1024
    runs = []
    for _ in range(3):
        with open_engine("rotary", quarter, copy_budget=2 * slot_bytes) as e:
            g = e.complete(prompt(32), n_tokens, ignore_eos=True)
            s = e.rotation.plugin.stats()
            admitted = sum(x.admissions for x in e.rotation.layer_stats())
            prefetched = sum(x.prefetches for x in e.rotation.layer_stats())
            runs.append((len(g.tokens), admitted, s.off_thread_calls, g.decode_tokens_per_second, prefetched,
                         s.prefetch_stall_ns / 1e6))
    ok = all(t == n_tokens and a + pf > 0 and off == 0 for t, a, off, _, pf, _ in runs)  # copies of either kind
    result(ok, "; ".join(f"{t} tokens, {a} admitted, {off} copier-thread device calls, {r:.1f} tok/s, "
                         f"{pf} prefetched (waits {w:.1f} ms)" for t, a, off, r, pf, w in runs))
elif check == "3":
    n_tokens = 32 if cpu else 256
    parts = []
    for name, placement, slots in (("experts-on-host", "experts-on-host", None), ("rotary 0 slots", "rotary", 0),
                                   ("rotary all slots", "rotary", "all")):
        with open_engine(placement, slots, rotate=False) as e:
            g = e.complete(prompt(64), n_tokens, ignore_eos=True)
            extra = ""
            if e.rotation:
                s = e.rotation.plugin.stats()
                steps = max(1, n_tokens * len(e.index.moe_layers))
                extra = (f" ({s.device_syncs / steps:.2f} syncs, {s.transfers / steps:.2f} transfers per layer"
                         " per token)")
            parts.append(f"{name} {g.decode_tokens_per_second:.1f} tok/s{extra}")
    result(True, "; ".join(parts))
elif check == "4":
    n = 64 if cpu else 512
    fields = {"max_batch": 8} if cpu else {}
    with open_engine("rotary", **fields) as e:
        seen = {}
        e.rotation.watch(lambda phase, routing: seen.update(routing) if phase == "prompt" else None)
        e.complete(prompt(n), 1, ignore_eos=True)
        empty = [layer for layer in e.index.moe_layers if len(seen.get(layer, ())) == 0]
        first = len(seen.get(e.index.moe_layers[0], ()))
        result(not empty and first == n * e.index.params.n_expert_used,
               f"{n}-token prompt: layer 0 holds {first} ids; layers without ids: {empty or 'none'}")
else:
    parts, rates = [], []
    for threads in sorted({cores, max(1, cores - 1)}, reverse=True):
        with open_engine("rotary", quarter, threads=threads, copy_budget=4 * slot_bytes) as e:
            e.complete(prompt(32), 32 if cpu else 256, ignore_eos=True)
            s = e.rotation.plugin.stats()
            rates.append(s.copy_gbs or 0)
            parts.append(f"n_threads {threads}: copier {s.copy_gbs or 0:.2f} GB/s over {s.copy_chunks} chunks, "
                         f"{s.stalls} stalls, {s.stall_ns / 1e6:.1f} ms stalled")
    result(all(r > 0 for r in rates), "; ".join(parts))
PY

failed=0
run_check() {  # number, title, expected, extra environment...
    local number=$1 title=$2 expected=$3
    shift 3
    local line
    line=$(env "$@" "$PY" -c "$CHECK" "$number" "$MODE" "$MODEL" 2>"$REPORT.stderr" | tail -1)
    [ -n "$line" ] || line="FAIL no result: $(tail -1 "$REPORT.stderr")"
    case "$line" in PASS*) ;; *) failed=1 ;; esac
    {
        echo "## $number $title"
        echo "expected: $expected"
        echo
        echo "$line"
        echo
    } >> "$REPORT"
    echo "$number $title: $line"
}

run_check 1 "split assignment" "the plugin computes splits for both prompts; every logit finite" \
    GGML_CUDA_DISABLE_GRAPHS=1 GGML_SCHED_DEBUG=1
run_check 2 "rotation with CUDA graphs" "three runs, all tokens, experts admitted or prefetched, 0 copier-thread device calls"
run_check 3 "decode tok/s" "all-slots rotary >= experts-on-host on a GPU; 1 sync and 3 transfers per split layer"
if [ "$MODE" = gpu ] && command -v nsys >/dev/null; then
    nsys profile -o "${REPORT%.md}-nsys" --force-overwrite true "$PY" -c "$CHECK" 3 "$MODE" "$MODEL" >/dev/null 2>&1 \
        && nsys stats --report cuda_api_sum "${REPORT%.md}-nsys.nsys-rep" >> "$REPORT" 2>/dev/null
fi
run_check 4 "prompt routing" "every layer holds the whole prompt's ids (n_tokens x experts used)"
run_check 5 "copier" "a measured rate > 0 at both thread counts; stalls reported"
rm -f "$REPORT.stderr"
echo "report: $REPORT"
exit $failed

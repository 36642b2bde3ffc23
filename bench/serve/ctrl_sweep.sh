#!/usr/bin/env bash
# The controller sweep of issue 14 in one command: auto vs fixed batch 4, 8, 16, 32 on the same
# closed loop (default 16 clients), TTFT p50/p95, inter-token and e2e percentiles, tok/s, the batch
# limit's variation, the server's own figures beside the load generator's, and the mixed workload
# (urgent short prompts, ~700-token prompts, background), in one server run.
#
#   bench/serve/ctrl_sweep.sh                 # builds build/ (Release, no CUDA) if needed, runs
#   LEVELS=16,32 bench/serve/ctrl_sweep.sh    # more client levels
#   OUT=bench/results/ctrl_sweep16 PER_CLIENT=4 MAX_TOKENS=32 bench/serve/ctrl_sweep.sh
#
# Writes $OUT.md and $OUT.json (default bench/results/ctrl_sweep16). Each table row carries the
# host's 1-minute load average before and after that mode ran and the CPUs the server process
# got meanwhile (CPU time / wall time): on a shared machine, compare rows only where those are
# about the same.
set -euo pipefail
cd "$(dirname "$0")/../.."

BUILD=${KRS_BUILD_DIR:-build}
LEVELS=${LEVELS:-16}
MODES=${MODES:-auto,4,8,16,32}
PER_CLIENT=${PER_CLIENT:-2}
MAX_TOKENS=${MAX_TOKENS:-16}
MIXED_CLIENTS=${MIXED_CLIENTS:-16}
THREADS=${THREADS:-$(nproc)}
OUT=${OUT:-bench/results/ctrl_sweep16}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ ! -x "$BUILD/krserve" ]; then
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKRS_CUDA=OFF >/dev/null
    cmake --build "$BUILD" -j "$(nproc)" --target krserve
fi

exec "$PY" bench/serve/ctrl_bench.py --exe "$BUILD/krserve" --threads "$THREADS" \
    --levels "$LEVELS" --modes "$MODES" --per-client "$PER_CLIENT" --max-tokens "$MAX_TOKENS" \
    --mixed-clients "$MIXED_CLIENTS" --md "$OUT.md" --json "$OUT.json" "$@"

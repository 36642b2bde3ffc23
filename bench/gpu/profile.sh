#!/usr/bin/env bash
# Per-kernel time of kr-serve's decode and prefill steps on the GPU, with Nsight Compute.
#
# usage (on the GPU machine): bench/gpu/profile.sh CARRY OUT [RUNS]
#   CARRY: build-cuda/bench-carry (scripts/device-test.sh stage-bench); OUT: where the CSVs go.
#   RUNS: comma list of NAME:MODEL:BATCH (MODEL default|llama1b), default
#         "default1:default:1,llama1:llama1b:1,llama8:llama1b:8".
# Each run is `bench_model --batches BATCH --steps 2` under ncu (clocks left alone), so the CSV
# holds every kernel of: the context prefill, three decode steps and four 512-token prefills.
# bench/gpu/profile_summary.py groups them by phase and kernel. Not a benchmark: ncu serialises
# kernels, so times include each kernel's ramp-up and tail that PDL overlaps in a real step.
set -u -o pipefail
CARRY=$(cd "$1" && pwd) OUT=$2 RUNS=${3:-default1:default:1,llama1:llama1b:1,llama8:llama1b:8}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$CARRY/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -f /tmp/standin.gguf ] || python3 "$ROOT/scripts/synth_model.py" expand "$CARRY/standin" /tmp/standin.gguf
[ -f /tmp/llama1b.gguf ] || python3 "$ROOT/scripts/synth_model.py" expand "$CARRY/llama1b" /tmp/llama1b.gguf
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for run in ${RUNS//,/ }; do
    IFS=: read -r name model batch <<<"$run"
    file=/tmp/standin.gguf
    [ "$model" = llama1b ] && file=/tmp/llama1b.gguf
    timeout 280 "$NCU" --clock-control none --csv --metrics \
        gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        "$CARRY/bin/bench_model" "$file" --device cuda --batches "$batch" --steps 2 \
        --prefill-chunk 512 --bandwidth-gbs 4224 >"$OUT/ncu_$name.csv" 2>"$OUT/ncu_$name.err"
    echo "ncu $name rc=$? lines=$(wc -l <"$OUT/ncu_$name.csv")"
done

#!/usr/bin/env bash
# A/B of CUDA backend switches (docs/configuration.md) in one run on the GPU machine.
#
# usage: bench/gpu/ab.sh CARRY OUT [BATCHES]
#   CARRY: build-cuda/bench-carry (scripts/device-test.sh stage-bench); OUT: logs.
#   AB_SETTINGS: ';'-separated settings, each a space-separated list of VAR=VALUE (an empty one
#   is the defaults), e.g. "; KRS_CUDA_ATTN_TILE=0; KRS_CUDA_MV_HALF_ROWS=8". BENCH=NAME in a
#   setting runs CARRY/bin/NAME instead of bench_model: two builds (a saved copy of the one
#   before a change, and the one after) compare in the same run.
#   AB_MODELS: default "default llama1b". Prints one line per (setting, model): decode tok/s at
#   each batch and prefill tok/s, from bench_model.
set -u -o pipefail
CARRY=$(cd "$1" && pwd) OUT=$2 BATCHES=${3:-1,2,4,8,16,32,64,256}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$CARRY/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -f /tmp/standin.gguf ] || python3 "$ROOT/scripts/synth_model.py" expand "$CARRY/standin" /tmp/standin.gguf >/dev/null
[ -f /tmp/llama1b.gguf ] || python3 "$ROOT/scripts/synth_model.py" expand "$CARRY/llama1b" /tmp/llama1b.gguf >/dev/null
IFS=';' read -r -a settings <<<"${AB_SETTINGS:-}"
[ ${#settings[@]} -eq 0 ] && settings=("")
i=0
for set in "${settings[@]}"; do
    for model in ${AB_MODELS:-default llama1b}; do
        file=/tmp/standin.gguf
        [ "$model" = llama1b ] && file=/tmp/llama1b.gguf
        log="$OUT/ab_${i}_$model.log"
        bin=bench_model
        for kv in $set; do [[ $kv == BENCH=* ]] && bin=${kv#BENCH=}; done
        env $set timeout 120 "$CARRY/bin/$bin" "$file" --device cuda --batches "$BATCHES" \
            --steps 32 --prefill-chunk 512 --bandwidth-gbs 4224 >"$log" 2>&1
        rc=$?
        dec=$(grep -E '^decode batch' "$log" | awk '{printf "%s:%.0f ", $3, $4}')
        pf=$(grep -oE 'chunks of [0-9]+\): [0-9.]+' "$log" | awk '{printf "%.0f", $4}')
        printf '%-40s %-8s rc=%d decode %s prefill %s\n' "[${set:-defaults}]" "$model" "$rc" "$dec" "$pf"
    done
    i=$((i + 1))
done

#!/usr/bin/env bash
# kr-serve vs llama.cpp on one GPU, in one run, on the same GGUF file (run on the GPU machine).
#
# usage: bench/gpu/peer_bench.sh CARRY MODEL.gguf LLAMA_TARBALL_DIR OUTDIR
#   CARRY           a folder with bin/{krserve,bench_model} and lib/ (scripts/device-test.sh build)
#   MODEL.gguf      the model both engines load (e.g. the default model's stand-in)
#   LLAMA_TARBALL_DIR  holds build-llama.sh and the llama.cpp tarball (../shared/peers copied)
# Steps, each logged under OUTDIR and bounded in time:
#   1. builds llama.cpp with CUDA (build-llama.sh cuda, ~4 min on 16 cores) unless
#      /tmp/llama-cuda/bin already has it (start the build earlier to overlap other work), then
#      kr-serve's bench_model (decode at 1..256 sequences, prefill 512), nothing else running;
#   2. llama-bench (pp512, tg128) and llama-batched-bench (S_TG at the same sequence counts, 64
#      prompt + 64 generated tokens each) on the same file;
#   3. bench/serve/peer_compare.py: `krserve serve --device cuda` and llama-server, the same
#      closed-loop load at PEER_CLIENTS (default 1,16,64,256) clients.
# Writes OUTDIR/summary.md with the three tables.
set -u -o pipefail
CARRY=$1 MODEL=$2 PEERS=$3 OUT=$4
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$CARRY/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BATCHES=${PEER_BATCHES:-1,8,32,64,128,256}
LLAMA=/tmp/llama-cuda

if [ ! -x $LLAMA/bin/llama-server ]; then
    bash "$PEERS/build-llama.sh" cuda $LLAMA >"$OUT/llama_build.log" 2>&1
    echo "llama build rc=$?"
fi

timeout 120 "$CARRY/bin/bench_model" "$MODEL" --device cuda --batches "$BATCHES" --steps 64 \
    --bandwidth-gbs "${PEER_BW_GBS:-4290}" --md "$OUT/krserve_bench_model.md" \
    >"$OUT/krserve_bench_model.log" 2>&1
echo "krserve bench_model rc=$?"

if [ -x $LLAMA/bin/llama-bench ]; then
    timeout 120 $LLAMA/bin/llama-bench -m "$MODEL" -ngl 99 -p 512 -n 128 -r 3 \
        >"$OUT/llama_bench.md" 2>"$OUT/llama_bench.err"
    echo "llama-bench rc=$?"
    maxnpl=$(echo "$BATCHES" | tr ',' '\n' | sort -n | tail -1)
    timeout 180 $LLAMA/bin/llama-batched-bench -m "$MODEL" -ngl 99 -c $((maxnpl * 128 + 256)) \
        -b 2048 -ub 512 -npp 64 -ntg 64 -npl "$BATCHES" >"$OUT/llama_batched_bench.txt" \
        2>"$OUT/llama_batched_bench.err"
    echo "llama-batched-bench rc=$?"
fi

server_args=()
[ -x $LLAMA/bin/llama-server ] && server_args=(--llama-server $LLAMA/bin/llama-server)
timeout "${PEER_SERVE_TIMEOUT:-240}" python3 -u "$ROOT/bench/serve/peer_compare.py" \
    --model "$MODEL" --krserve "$CARRY/bin/krserve" --device cuda \
    --clients "${PEER_CLIENTS:-1,16,64,256}" --max-tokens 128 --per-client 1 \
    --md "$OUT/serve_compare.md" --json "$OUT/serve_compare.json" --logs "$OUT" "${server_args[@]}" \
    >"$OUT/serve_compare.log" 2>&1
echo "peer_compare rc=$?"

{
    echo "# kr-serve vs llama.cpp, one run on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
    echo
    echo "Model: $(basename "$MODEL")"
    echo
    echo "## kr-serve bench_model (decode tok/s aggregate; prefill)"
    sed -n '/^| concurrent/,$p' "$OUT/krserve_bench_model.md" 2>/dev/null
    echo
    echo "## llama-bench"
    cat "$OUT/llama_bench.md" 2>/dev/null
    echo
    echo "## llama-batched-bench (S_TG = aggregate decode tok/s)"
    grep -E "^\|" "$OUT/llama_batched_bench.txt" 2>/dev/null
    echo
    cat "$OUT/serve_compare.md" 2>/dev/null
} >"$OUT/summary.md"
cat "$OUT/summary.md"

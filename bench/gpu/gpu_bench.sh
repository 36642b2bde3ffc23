#!/usr/bin/env bash
# kr-serve vs llama.cpp (and Hugging Face transformers) on one GPU, in one run, on the same GGUF
# files: the GPU speed issue's benchmark. Runs on the GPU machine (no apt, no internet).
#
# usage: bench/gpu/gpu_bench.sh CARRY PEERS OUT [STEPS]
#   CARRY  bin/{krserve,bench_model}, lib/ (scripts/device-test.sh build), standin/ (the default
#          model's header: synth_model.py skeleton) and llama1b/ (synth_model.py llama1b)
#   PEERS  holds build-llama.sh and the llama.cpp tarball (../shared/peers, copied in the tree)
#   OUT    results: machine.json, kr_<model>.json, llama_bench_<model>.json,
#          llama_batched_<model>.txt, hf_llama1b.json, serve_compare.{json,md}, logs; then
#          bench/gpu/report.py turns them into results.json + README.md (+ plot.png where
#          matplotlib exists; else run report.py again where it does)
#   STEPS  comma list, default all, in this order:
#          models   expand the stand-ins: the default model's shape (Gemma 3 270M Q4_K_M) and
#                   the Llama-3.2-1B shape in F16 (random weights: speed, not text)
#          build    llama.cpp with CUDA (build-llama.sh, ~4 min on 16 cores) unless built
#          bw       device-to-device copy bandwidth (torch), the roofline's denominator
#          kr       bench_model --device cuda: decode at 1..256 sequences, prefill of 512
#          llama    llama-bench pp512/tg128 and llama-batched-bench S_TG at the same counts
#          hf       transformers generate() on the 1B shape at batch 1 and 64
#          serve    bench/serve/peer_compare.py: krserve serve --device cuda vs llama-server on
#                   the default model's stand-in at PEER_CLIENTS (default 1,16,64,256) clients
# One call of the lent-machine tool has 10 minutes: run "models,build,bw,kr,llama,hf" in one
# call and "serve" in the next while the machine is still warm (/tmp keeps the models and the
# llama.cpp build).
set -u -o pipefail
CARRY=$(cd "$1" && pwd) PEERS=$2 OUT=$3 STEPS=${4:-models,build,bw,kr,llama,hf,serve}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$CARRY/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BATCHES=${PEER_BATCHES:-1,8,32,64,128,256}
LLAMA=/tmp/llama-cuda
MODELS="default:/tmp/standin.gguf llama1b:/tmp/llama1b.gguf"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

if has models; then
    [ -f /tmp/standin.gguf ] || python3 "$ROOT/scripts/synth_model.py" expand "$CARRY/standin" \
        /tmp/standin.gguf
    [ -f /tmp/llama1b.gguf ] || python3 "$ROOT/scripts/synth_model.py" expand "$CARRY/llama1b" \
        /tmp/llama1b.gguf
    log "models ready"
fi

if has build && [ ! -x $LLAMA/bin/llama-server ]; then
    bash "$PEERS/build-llama.sh" cuda $LLAMA >"$OUT/llama_build.log" 2>&1
    log "llama.cpp build rc=$?"
fi

if has bw; then
    python3 - "$OUT/machine.json" <<'EOF'
import json, platform, subprocess, sys, time
import torch
x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
n = 20
t0 = time.perf_counter()
for _ in range(n):
    y.copy_(x)
torch.cuda.synchronize()
copy = 2 * x.numel() * 4 * n / (time.perf_counter() - t0) / 1e9  # read + write
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l), "")
json.dump({"gpu": smi, "cpu": cpu, "cores": len(__import__("os").sched_getaffinity(0)),
           "copy_bandwidth_gbs": copy, "torch": torch.__version__,
           "kernel": platform.release()}, open(sys.argv[1], "w"), indent=1)
print(f"device copy bandwidth {copy:.0f} GB/s (read + write)")
EOF
    log "bandwidth rc=$?"
fi
BW=$(python3 -c "import json;print(round(json.load(open('$OUT/machine.json'))['copy_bandwidth_gbs']))" 2>/dev/null || echo 4290)

if has kr; then
    for mm in $MODELS; do
        name=${mm%%:*} file=${mm#*:}
        timeout 150 "$CARRY/bin/bench_model" "$file" --device cuda --batches "$BATCHES" \
            --steps 64 --prefill-chunk 512 --bandwidth-gbs "$BW" --json "$OUT/kr_$name.json" \
            >"$OUT/kr_$name.log" 2>&1
        log "kr-serve bench_model $name rc=$? $(grep -E 'batch  1:' "$OUT/kr_$name.log")"
    done
fi

if has llama && [ -x $LLAMA/bin/llama-bench ]; then
    maxnpl=$(echo "$BATCHES" | tr ',' '\n' | sort -n | tail -1)
    for mm in $MODELS; do
        name=${mm%%:*} file=${mm#*:}
        timeout 150 $LLAMA/bin/llama-bench -m "$file" -ngl 99 -p 512 -n 128 -r 3 -o json \
            >"$OUT/llama_bench_$name.json" 2>"$OUT/llama_bench_$name.err"
        log "llama-bench $name rc=$?"
        timeout 200 $LLAMA/bin/llama-batched-bench -m "$file" -ngl 99 -c $((maxnpl * 128 + 256)) \
            -b 2048 -ub 512 -npp 64 -ntg 64 -npl "$BATCHES" >"$OUT/llama_batched_$name.txt" \
            2>"$OUT/llama_batched_$name.err"
        log "llama-batched-bench $name rc=$?"
    done
fi

if has hf; then
    timeout 240 python3 -u "$ROOT/bench/gpu/hf_generate.py" --batches 1,64 --prompt 64 --new 64 \
        --json "$OUT/hf_llama1b.json" >"$OUT/hf_llama1b.log" 2>&1
    log "transformers rc=$? $(tail -n 2 "$OUT/hf_llama1b.log" | tr '\n' ' ')"
fi

if has serve; then
    server_args=()
    [ -x $LLAMA/bin/llama-server ] && server_args=(--llama-server $LLAMA/bin/llama-server)
    timeout "${PEER_SERVE_TIMEOUT:-500}" python3 -u "$ROOT/bench/serve/peer_compare.py" \
        --model /tmp/standin.gguf --krserve "$CARRY/bin/krserve" --device cuda \
        --clients "${PEER_CLIENTS:-1,16,64,256}" --max-tokens 128 --per-client 2 \
        --md "$OUT/serve_compare.md" --json "$OUT/serve_compare.json" --logs "$OUT" \
        "${server_args[@]}" >"$OUT/serve_compare.log" 2>&1
    log "peer_compare rc=$?"
fi

python3 "$ROOT/bench/gpu/report.py" "$OUT" "$OUT"
log "report rc=$?"

#!/usr/bin/env bash
# The controller benchmarks on the lent GPU host's CPU, pinned to two cores: a quiet stand-in
# for the shared 2-core VM (where three other engineers' builds make timings meaningless).
#
#   bench/serve/device_ctrl.sh stage          here: build-dev/ = krserve (from build/), the
#                                             Debian .so files it needs, the default model's
#                                             skeleton (scripts/synth_model.py), llama.cpp's
#                                             tarball and build script
#   bench/serve/device_ctrl.sh ctrl [ARGS]    there (carry ["build-dev"]): expands the stand-in,
#                                             runs ctrl_bench.py with the server on cores 0-1
#                                             (--threads 2) and the load generator on 2-3;
#                                             results to $OUT; ARGS go to ctrl_bench.py
#   bench/serve/device_ctrl.sh peer [ARGS]    there: builds llama-server (cores 4-15, once per
#                                             machine) and runs peer_compare.py, both servers
#                                             on cores 0-1 with 2 threads; ARGS to peer_compare
# The stand-in has the default model's shapes, types and tokenizer with random weights: the
# timings are the model's, the text is gibberish (every request uses ignore_eos).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
D=$ROOT/build-dev
OUT=${OUT:-$ROOT/device-out}
cd "$ROOT"

stage() {
    rm -rf "$D"
    mkdir -p "$D/bin" "$D/lib" "$D/peer"
    cp build/krserve "$D/bin/"
    ldd build/krserve | awk '/=> \// {print $3}' |
        grep -Ev '/(libc|libm|libdl|librt|libpthread|ld-linux[^/]*|libstdc\+\+|libgcc_s)\.so' |
        while read -r lib; do cp -L "$lib" "$D/lib/"; done
    .venv/bin/python scripts/synth_model.py skeleton models/default.gguf "$D/standin" >/dev/null
    cp /work/shared/peers/llama.cpp-*.tar.gz /work/shared/peers/build-llama.sh "$D/peer/"
    du -sh "$D"
}

standin() {
    [ -f /tmp/standin.gguf ] || python3 scripts/synth_model.py expand "$D/standin" /tmp/standin.gguf
    # pinned wrappers: the servers on cores 0-1
    cat >/tmp/krserve-pinned <<EOF
#!/bin/sh
LD_LIBRARY_PATH=$D/lib exec taskset -c 0,1 $D/bin/krserve "\$@"
EOF
    chmod +x /tmp/krserve-pinned
}

ctrl() {
    standin
    mkdir -p "$OUT"
    lscpu | grep -E "Model name|^CPU\(s\)" >"$OUT/machine.txt"
    taskset -c 2,3 python3 bench/serve/ctrl_bench.py --exe /tmp/krserve-pinned \
        --model /tmp/standin.gguf --threads 2 --md "$OUT/ctrl.md" --json "$OUT/ctrl.json" "$@"
    cp /tmp/ctrl_bench_server.log "$OUT/" 2>/dev/null || true
}

peer() {
    standin
    mkdir -p "$OUT"
    local bin=$ROOT/build-llama/bin
    if [ ! -x "$bin/llama-server" ]; then
        cp "$D"/peer/* /tmp/
        taskset -c 4-15 bash /tmp/build-llama.sh cpu "$ROOT/build-llama" >"$OUT/llama-build.log" 2>&1
    fi
    cat >/tmp/llama-pinned <<EOF
#!/bin/sh
exec taskset -c 0,1 $bin/llama-server "\$@"
EOF
    chmod +x /tmp/llama-pinned
    taskset -c 2,3 python3 bench/serve/peer_compare.py --model /tmp/standin.gguf \
        --krserve /tmp/krserve-pinned --llama-server /tmp/llama-pinned --threads 2 \
        --md "$OUT/peer.md" --json "$OUT/peer.json" "$@"
}

case ${1:-} in
stage | ctrl | peer) cmd=$1; shift; "$cmd" "$@" ;;
*) sed -n 2,20p "$0"; exit 2 ;;
esac

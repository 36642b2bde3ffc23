#!/usr/bin/env bash
# Every test of kr-serve, in the order that fails fastest:
#   1. clang-format check      2. Release build (-Wall -Wextra -Werror, the CUDA backend where
#      nvcc exists)            3. ctest + pytest (oracles, CLI, server) over a gcov-instrumented
#      -O2 build (scripts/coverage.sh), failing below KRS_COVERAGE_MIN (85) % of src/ lines
#   4. ASan+UBSan build + ctest   5. TSan build + the scheduler, util and JSON-RPC tests
#   6. libFuzzer targets, bounded time each
# KRS_FUZZ_SECONDS (default 60 for the GGUF parser, 30 for the others) bounds fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=$(nproc)
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n=== %s\n' "$*"; }

step "clang-format"
files=$(git ls-files --cached --others --exclude-standard '*.c' '*.h' '*.cu' | grep -v '^fuzz/corpus/' || true)
if [ -n "$files" ]; then
  clang-format --dry-run --Werror $files
fi

# The CUDA backend is compiled wherever nvcc exists (CI has it, no GPU): CUDA code that does not
# build fails the run; its GPU tests skip with the reason where no GPU is present.
NVCC=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)
CUDA_ARGS=(-DKRS_CUDA=OFF)
[ -n "$NVCC" ] && CUDA_ARGS=(-DKRS_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC")
step "build (Release, -Wall -Wextra -Werror${NVCC:+, CUDA backend})"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "${CUDA_ARGS[@]}" >/dev/null
cmake --build build -j "$JOBS"

step "C unit tests (ctest) + Python tests (pytest) over the coverage build"
scripts/coverage.sh "${KRS_COVERAGE_MIN:-85}"

# The sanitizer runs drive the model/scheduler tests with a tiny generated model (pytest made it
# above) so that they stay fast; the Release run above used the real default model.
TINY=$(ls -t tests/.cache/models/*/gemma3/Q8_0.gguf 2>/dev/null | head -n 1 || true)
export KRS_TEST_MODEL="$TINY"

step "ASan+UBSan build + C unit tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DKRS_SANITIZE=address,undefined >/dev/null
cmake --build build-asan -j "$JOBS"
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan --output-on-failure -j "$JOBS" -LE slow

if ls tests/sched/test_*.c >/dev/null 2>&1; then
  step "TSan build + scheduler, util and JSON-RPC tests"
  cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=Debug -DKRS_SANITIZE=thread >/dev/null
  tsan_targets=$(for t in tests/sched/test_*.c tests/util/test_*.c tests/rpc/test_*.c; do
    d=$(basename "$(dirname "$t")"); echo "${d}_$(basename "$t" .c)"; done)
  cmake --build build-tsan -j "$JOBS" --target $tsan_targets  # only what runs under TSan
  TSAN_OPTIONS=halt_on_error=1 ctest --test-dir build-tsan --output-on-failure -L 'sched|util|rpc'
fi

if ls fuzz/fuzz_*.c >/dev/null 2>&1; then
  step "libFuzzer targets"
  CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Debug -DKRS_FUZZ=ON >/dev/null
  targets=$(for src in fuzz/fuzz_*.c; do basename "$src" .c; done)
  cmake --build build-fuzz -j "$JOBS" --target $targets  # only the fuzzers, not every test
  for src in fuzz/fuzz_*.c; do
    name=$(basename "$src" .c)
    corpus=fuzz/corpus/${name#fuzz_}
    secs=${KRS_FUZZ_SECONDS:-30}
    [ "$name" = fuzz_gguf ] && secs=${KRS_FUZZ_SECONDS:-60}
    work=$(mktemp -d)
    [ -d "$corpus" ] && cp -r "$corpus"/. "$work"/
    echo "fuzzing $name for ${secs}s"
    build-fuzz/"$name" -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=0 "$work" 2>&1 | tail -n 3
    rm -rf "$work"
  done
fi

step "all tests passed"

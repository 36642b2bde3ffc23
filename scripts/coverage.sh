#!/usr/bin/env bash
# Line coverage of src/ by the whole test run: the C tests (ctest) and the Python tests that
# drive the binaries (pytest), over a gcov-instrumented -O2 build in build-cov (no CUDA: the
# GPU code cannot run where there is no GPU, and is left out of the figure).
#
# usage: scripts/coverage.sh [MIN_PERCENT]
#   writes build-cov/coverage/index.html (per file and line) and build-cov/coverage.txt, and
#   prints as its last line "coverage: NN.N% of src/ lines"; with MIN_PERCENT it fails below.
# scripts/test.sh runs the tests this way (instead of over the Release build) and gates on 85.
set -euo pipefail
cd "$(dirname "$0")/.."
MIN=${1:-}
JOBS=$(nproc)
export PATH="$PWD/.venv/bin:$PATH"
cmake -S . -B build-cov -DCMAKE_BUILD_TYPE=Release -DKRS_COVERAGE=ON -DKRS_CUDA=OFF >/dev/null
cmake --build build-cov -j "$JOBS"
find build-cov -name '*.gcda' -delete
ctest --test-dir build-cov --output-on-failure -j "$JOBS"
KRS_BUILD_DIR="$PWD/build-cov" python -m pytest -q tests
mkdir -p build-cov/coverage
gcovr -r . --object-directory build-cov --filter 'src/' --exclude 'src/backend/cuda/' \
  --gcov-ignore-parse-errors=negative_hits.warn_once_per_file \
  --gcov-ignore-parse-errors=suspicious_hits.warn_once_per_file \
  --html-details build-cov/coverage/index.html --txt build-cov/coverage.txt \
  --print-summary >build-cov/coverage.summary
pct=$(awk '/^lines:/ {sub("%", "", $2); print $2}' build-cov/coverage.summary)
echo "coverage: ${pct}% of src/ lines (report: build-cov/coverage/index.html)"
if [ -n "$MIN" ] && awk -v p="$pct" -v m="$MIN" 'BEGIN { exit !(p < m) }'; then
  echo "coverage ${pct}% is below the required ${MIN}%" >&2
  exit 1
fi

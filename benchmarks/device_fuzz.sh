#!/usr/bin/env bash
# Reliability on the GPU, one device call (< 7 minutes):
#   1. the gpu sections of tests/test_errors_layer.py (the whole error catalogue, ops + layer, on
#      CUDA tensors in one process, then a correct GEMM: no sticky CUDA error; quant dtypes) and
#      tests/test_nan_policy.py (NaN/Inf/zero-block policy through the kernels) — skip: --no-tests;
#   2. tests/fuzz_gpu.py: 500 random shapes per op (8 ops) against the references, every kernel
#      they need compiled in parallel first, < 4 minutes; results in
#      benchmarks/results/fuzz_<date>.csv (+ fuzz_<date>_failures.txt when something failed).
# Usage (repo root, GPU machine): MOE_FP8_COMMIT=<sha> bash benchmarks/device_fuzz.sh [--no-tests] [count] [seed]
# Files back under $OUT: summary.txt, the CSV (+ failures), logs.tgz. Exit: 0 when both passed.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
FINAL="${OUT:-/tmp/moe_fp8_fuzz_out}"
RAW="$FINAL/raw"; mkdir -p "$RAW"
export MOE_FP8_CACHE_DIR="${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}"
TESTS=1; [ "${1:-}" = "--no-tests" ] && { TESTS=0; shift; }
COUNT="${1:-500}"
SEED_ARGS=(); [ -n "${2:-}" ] && SEED_ARGS=(--seed "$2")
DAY="$(date +%F)"
summary="$FINAL/summary.txt"; : > "$summary"

step() {  # step NAME TIMEOUT_S CMD...: log to $RAW/NAME.log, one summary line
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$RAW/$name.log" 2>&1; local rc=$?
  printf '%-6s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -aE 'passed|failed|skipped|error|^fuzz: [0-9]' "$RAW/$name.log" | tail -n 1 | cut -c1-120)" >> "$summary"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RAW/gpu.txt" 2>&1
rc_tests=0
if [ "$TESTS" = 1 ]; then
  step tests 170 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEX \
    tests/test_errors_layer.py tests/test_nan_policy.py; rc_tests=$?
fi
# 200 s for compiling + cases inside the fuzzer; the hard limit leaves room for start-up
step fuzz 235 python3 tests/fuzz_gpu.py --count "$COUNT" --time-budget 200 "${SEED_ARGS[@]}"; rc_fuzz=$?
cp benchmarks/results/fuzz_"$DAY".csv benchmarks/results/fuzz_"$DAY"_failures.txt "$FINAL/" 2>/dev/null
{
  cat "$RAW/gpu.txt"
  [ "$TESTS" = 1 ] && grep -aE "^(FAILED|ERROR|XPASS)" "$RAW/tests.log" | cut -c1-160 | head -n 10
  grep -aE "^fuzz: seed|precompile|fatal|time budget" "$RAW/fuzz.log" | head -n 4
  grep -aE "^  FAIL" "$RAW/fuzz.log" | cut -c1-200 | head -n 6
  grep -aE "^\||^fuzz: [0-9]" "$RAW/fuzz.log"
} >> "$summary"
tar czf "$FINAL/logs.tgz" -C "$RAW" . && rm -rf "$RAW"
cat "$summary"
[ "$rc_tests" = 0 ] && [ "$rc_fuzz" = 0 ]

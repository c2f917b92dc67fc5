#!/usr/bin/env bash
# One device call after a default flips: the GPU tests it touches, the tables (bench_gemm,
# bench_grouped contiguous, bench_layer, bench_train, bench_quant --decode), then
# compute-sanitizer on the named tests. Each step's table prints as it ends.
#   cd .snap && MOE_FP8_COMMIT=<sha> TESTS_K="..." SAN_K="..." bash benchmarks/device_verify.sh
# TESTS_K: pytest -k over the GEMM, layer and training GPU tests (empty: all of them; TEST_FILES
# replaces that list, TESTS_S its time limit); LAYER_SWITCH: bench_layer with that switch 0, then 1;
# SAN_K: pytest -k of test_gemm_gpu.py run under memcheck and racecheck (empty: skipped);
# TRAIN_SWITCH: bench_train with that environment switch 0, then 1;
# GROUPED_CONFIGS: pinned configs beside the contiguous rows; BENCHES: subset of "gemm grouped layer train quant" (default: all but quant, the decode rows). Logs: $OUT/verify.tgz.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL="${OUT:-/tmp/moe_fp8_out}"; RAW=/tmp/verify_raw; mkdir -p "$RAW" "$FINAL"
PYTEST="python3 -m pytest -q -p no:cacheprovider -m gpu"
run() {  # run NAME TIMEOUT_S CMD...: one status line, then a bench's table (so a cut call keeps it)
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  mkdir -p "$RAW/results-$name"  # each bench's result files, into verify.tgz (a call returns few files)
  OUT="$RAW/results-$name" timeout --kill-after=5 "$limit" "$@" > "$RAW/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s $(grep -aE 'passed|failed|Error|SUMMARY' "$RAW/$name.log" | tail -n 1 | cut -c1-110)"
  [[ "$name" == bench-* ]] && grep -aE "^\|" "$RAW/$name.log" | grep -v "^|--" | cut -c1-170 | tail -n 20
  [[ "$name" == san-* ]] && grep -aE "Race reported|Error:|Invalid|Warning:" "$RAW/$name.log" | cut -c1-240 | head -n 12
  tar -czf "$FINAL/verify.tgz" -C "$RAW" .
}
k_args=(); [ -n "${TESTS_K:-}" ] && k_args=(-k "$TESTS_K")
test_files=(${TEST_FILES:-tests/test_gemm_gpu.py tests/test_layer_gpu.py tests/test_autograd.py tests/test_layer_train.py})
run tests "${TESTS_S:-200}" $PYTEST "${test_files[@]}" "${k_args[@]}"
grep -aE "^FAILED" "$RAW/tests.log" | head -n 10
benches=" ${BENCHES:-gemm grouped layer train} "
[[ "$benches" == *" layer "* ]] && run bench-layer 80 python3 benchmarks/bench_layer.py --quick --repeats 5
[[ "$benches" == *" train "* ]] && run bench-train 80 python3 benchmarks/bench_train.py --quick --repeats 3
if [ -n "${LAYER_SWITCH:-}" ]; then  # bench_layer with an environment switch 0, then 1
  for v in 0 1; do
    run "bench-layer-$v" 80 env "$LAYER_SWITCH=$v" python3 benchmarks/bench_layer.py --quick --repeats 5
  done
fi
if [ -n "${TRAIN_SWITCH:-}" ]; then  # bench_train with an environment switch 0, then 1
  for v in 0 1; do
    run "bench-train-$v" 70 env "$TRAIN_SWITCH=$v" python3 benchmarks/bench_train.py --quick \
      --repeats 3 --no-profile
  done
fi
[[ "$benches" == *" grouped "* ]] && run bench-grouped 120 python3 benchmarks/bench_grouped.py --only contiguous \
  --repeats 10 ${GROUPED_CONFIGS:+--contiguous-configs "$GROUPED_CONFIGS"}
[[ "$benches" == *" gemm "* ]] && run bench-gemm 90 python3 benchmarks/bench_gemm.py --repeats 10
[[ "$benches" == *" quant "* ]] && run bench-quant 60 python3 benchmarks/bench_quant.py --decode --repeats 20
if [ -n "${SAN_K:-}" ]; then
  for tool in ${SAN_TOOLS:-memcheck racecheck}; do
    run "san-$tool" 120 env MOE_FP8_JIT_LINEINFO=1 MOE_FP8_CACHE_DIR=/tmp/moe_fp8_cache_lineinfo \
      compute-sanitizer --tool "$tool" --kernel-name kns=moe_fp8 --print-limit 20 \
      $PYTEST tests/test_gemm_gpu.py -k "$SAN_K"
  done
fi
tar -czf "$FINAL/verify.tgz" -C "$RAW" .

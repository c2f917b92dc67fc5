#!/usr/bin/env bash
# Device calls for this session's GEMM work, from a snapshot of HEAD (with .variants for the A/B,
# make_variants.sh). STEPS picks, in order (default "ab split gemm"):
#   ab      the GEMM A/B (device_check.sh PHASES=ab; AB_VARIANTS / AB_CONFIGS)
#   split   GPU tests: split K, the torch-path comparisons of the permute tests, the bf16 gate
#   gemm    bench_gemm with the small-M sweep (heuristic vs A multicast vs split K)
#   wgrad   GPU tests of the wgrad (incl. accumulate=False) and autograd, bench_wgrad, bench_train
#   verify  the new paths' GPU tests; small-M sweep; train with MOE_FP8_WGRAD_OVERWRITE=0/1; layer
#           with MOE_FP8_BF16_GATE=0/1
#   layer   bench_layer --quick (prefill / decode vs bf16 and the streaming floor)
#   fuzz    the fuzzer (all ops);  sanitize  compute-sanitizer (every family)
#   cd .snap && MOE_FP8_COMMIT=<sha> STEPS="..." bash benchmarks/device_gemm_new.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL="${OUT:-/tmp/moe_fp8_out}"; RAW="$FINAL/raw"; mkdir -p "$RAW"
steps=" ${STEPS:-ab split gemm} "
want() { [[ "$steps" == *" $1 "* ]]; }
run() {  # run NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$RAW/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s $(grep -aE 'passed|failed|Error' "$RAW/$name.log" | tail -n 1 | cut -c1-100)" \
    | tee -a "$RAW/summary.txt"
}
PYTEST="python3 -m pytest -q -s -p no:cacheprovider -m gpu"
if want ab && [ -n "${AB_VARIANTS:-}" ]; then
  DEVICE_BUDGET_S=${AB_BUDGET_S:-230} PHASES="ab" bash benchmarks/device_check.sh
fi
want split && run test-split 120 $PYTEST tests/test_gemm_gpu.py tests/test_permute_gpu.py \
  tests/test_router_gate.py -k "split_k or combine_matches or decode_runner_fused or gate"
want gemm && run bench-gemm "${BENCH_S:-230}" python3 benchmarks/bench_gemm.py --repeats 10 --sweep --sweep-m 64,128
if want wgrad; then
  run test-wgrad 150 $PYTEST tests/test_wgrad_gpu.py tests/test_autograd.py tests/test_layer_train.py
  run bench-wgrad 90 python3 benchmarks/bench_wgrad.py --repeats 10
  run bench-train 90 python3 benchmarks/bench_train.py --quick --repeats 3
fi
if want verify; then  # one call: every new path's GPU tests, then its A/B against the default
  run test-new 180 $PYTEST tests/test_gemm_gpu.py tests/test_permute_gpu.py tests/test_router_gate.py \
    tests/test_wgrad_gpu.py tests/test_autograd.py \
    -k "split_k or combine_matches or decode_runner_fused or gate or wgrad or overwrite or gpu_"
  run bench-gemm-small 90 python3 benchmarks/bench_gemm.py --repeats 10 --only-m 64,128 --sweep
  for flag in 0 1; do
    run "bench-train-overwrite$flag" 60 env MOE_FP8_WGRAD_OVERWRITE=$flag python3 benchmarks/bench_train.py \
      --quick --repeats 3 --no-profile
    run "bench-layer-gate$flag" 55 env MOE_FP8_BF16_GATE=$flag python3 benchmarks/bench_layer.py --quick --repeats 5
  done
fi
want layer && run bench-layer 70 python3 benchmarks/bench_layer.py --quick --repeats 5
want fuzz && run fuzz 200 python3 tests/fuzz_gpu.py
want sanitize && OUT="$RAW/sanitize" run sanitize 290 bash benchmarks/device_sanitize.sh
cp benchmarks/results/*_"$(date +%F)"* "$RAW/" 2>/dev/null
grep -aE "^\|" "$RAW/gemm-ab.log" 2>/dev/null | cut -c1-150
grep -aE "k[0-9]+ \|" "$RAW"/gemm_sweep_*.md 2>/dev/null | cut -c1-150 | tail -n 40
grep -aE "^\| (record|GEMM1|32)" "$RAW"/wgrad_*.md 2>/dev/null | cut -c1-200
grep -aE "^\| 8x4096" "$RAW"/train_*.md 2>/dev/null | cut -c1-150
grep -ahE "^\|" "$RAW/bench-layer.log" 2>/dev/null | tail -n 12 | cut -c1-150
for f in "$RAW"/bench-train-overwrite*.log "$RAW"/bench-layer-gate*.log; do
  [ -f "$f" ] && { echo "== $(basename "$f")"; grep -aE "^\|" "$f" | grep -avE "^\|--" | tail -n 8 | cut -c1-150; }
done
cat "$RAW/sanitize/summary.txt" 2>/dev/null

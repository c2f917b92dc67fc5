#!/usr/bin/env bash
# One device call for the GEMM A/B and split K (small M), from a snapshot of HEAD with .variants
# (make_variants.sh): the A/B (device_check.sh PHASES=ab), the split-K GPU tests, then bench_gemm
# with the small-M sweep (heuristic vs A multicast vs split K, graph and kernel-only times).
#   cd .snap && MOE_FP8_COMMIT=<sha> AB_VARIANTS="..." AB_CONFIGS="..." bash benchmarks/device_split_k.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL="${OUT:-/tmp/moe_fp8_out}"; RAW="$FINAL/raw"; mkdir -p "$RAW"
if [ -n "${AB_VARIANTS:-}" ]; then
  DEVICE_BUDGET_S=${AB_BUDGET_S:-230} PHASES="ab" bash benchmarks/device_check.sh
fi
timeout 120 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  tests/test_permute_gpu.py -k "split_k or combine_matches or decode_runner_fused" > "$RAW/test-split.log" 2>&1
echo "test-split rc=$? $(tail -n 1 "$RAW/test-split.log")" | tee -a "$RAW/summary.txt"
timeout "${BENCH_S:-230}" python3 benchmarks/bench_gemm.py --repeats 10 --sweep --sweep-m 64,128 \
  > "$RAW/bench-gemm.log" 2>&1
echo "bench-gemm rc=$?" | tee -a "$RAW/summary.txt"
cp benchmarks/results/*_"$(date +%F)"* "$RAW/" 2>/dev/null
grep -aE "^\|" "$RAW/gemm-ab.log" 2>/dev/null | cut -c1-150
grep -aE "k[0-9]+ \||^\| (64|128) " "$RAW"/gemm_sweep_*.md 2>/dev/null | cut -c1-150 | tail -n 40

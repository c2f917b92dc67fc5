#!/usr/bin/env bash
# Session 17, call 11 (~4 min, an H100): the gather with hardware arrivals.
#   1. GPU tests of the gather (GEMM bytes, layer bits, dispatch without rows), memcheck, racecheck;
#   2. decode_build_ab.py: defaults vs MOE_FP8_DECODE_GATHER=1 (128-row tiles too) at 128 / 256
#      tokens, and vs MOE_FP8_DECODE_GATHER=0 at 1 / 8 / 32 / 128.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s17h; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  tests/test_layer_gpu.py tests/test_permute_gpu.py -k "gather or without_rows" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q \
    -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k "test_masked_swiglu_gather_is_permuted and m128_sm3" \
    > "$RAW/sanitize_$tool.log" 2>&1
  echo "$tool gather rc=$? $(grep -aE "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$RAW/sanitize_$tool.log" | tail -n 2 | tr '\n' ' ')"
done
OUT="$RAW" timeout 150 python3 benchmarks/decode_build_ab.py --tokens 128,256 \
  --b-env MOE_FP8_DECODE_GATHER=1 > "$RAW/gather_all_ab.log" 2>&1
echo "defaults (A) vs MOE_FP8_DECODE_GATHER=1 (B) rc=$?"; grep -a "^{" "$RAW/gather_all_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/gather_all_ab.md" 2>/dev/null
OUT="$RAW" timeout 150 python3 benchmarks/decode_build_ab.py --tokens 1,8,32,128 \
  --b-env MOE_FP8_DECODE_GATHER=0 > "$RAW/gather_off_ab.log" 2>&1
echo "defaults (A) vs MOE_FP8_DECODE_GATHER=0 (B) rc=$?"; grep -a "^{" "$RAW/gather_off_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/gather_off_ab.md" 2>/dev/null
tar czf "$FINAL/s17h.tgz" -C "$RAW" . 2>/dev/null

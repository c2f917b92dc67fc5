#!/usr/bin/env bash
# Session 17, call 5 (~5 min, an H100): the decode gather by cp.async.
#   1. GPU tests: the gathering fused SwiGLU GEMM against the permuted one (bytes and scales), the
#      dispatch without rows, the decode runner's bits with MOE_FP8_DECODE_GATHER 0 / 1;
#   2. compute-sanitizer memcheck and racecheck of the gather GEMM test (128-row tiles, 3 SMs);
#   3. decode_build_ab.py: the defaults (A) vs MOE_FP8_DECODE_GATHER=1 (B), 1-256 tokens, 3 rounds;
#   4. profile_layer's 256-token decode timeline with the switch on.
# Everything under $OUT/s17e.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s17e; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  tests/test_layer_gpu.py tests/test_permute_gpu.py -k "gather or without_rows" \
  > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q \
    -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k "test_masked_swiglu_gather_is_permuted and m128_sm3" \
    > "$RAW/sanitize_$tool.log" 2>&1
  echo "$tool gather rc=$? $(grep -aE "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$RAW/sanitize_$tool.log" | tail -n 2 | tr '\n' ' ')"
done
OUT="$RAW" timeout 240 python3 benchmarks/decode_build_ab.py --tokens 1,8,32,128,256 \
  --b-env MOE_FP8_DECODE_GATHER=1 > "$RAW/gather_ab.log" 2>&1
echo "defaults (A) vs MOE_FP8_DECODE_GATHER=1 (B) rc=$?"; grep -a "^{" "$RAW/gather_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/gather_ab.md" 2>/dev/null
MOE_FP8_DECODE_GATHER=1 OUT="$RAW" timeout 120 python3 benchmarks/profile_layer.py --tokens \
  --decode 256 --mode nosync > "$RAW/profile_decode256.log" 2>&1
echo "== profile decode 256 (gather) rc=$?"
grep -aE "^\| " "$RAW/profile_decode256.log" | sed -n '/start_us/,/phase/p' | cut -c1-110 | head -n 16
tar czf "$FINAL/s17e.tgz" -C "$RAW" . 2>/dev/null

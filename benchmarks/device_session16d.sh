#!/usr/bin/env bash
# Session 16, call 5 (~7 min): two decode changes in the layer.
#   1. GPU tests: masked / swap-AB / fused SwiGLU GEMM tests and the decode runner tests (the
#      masked weight loads now carry an L2 evict_first policy; MOE_FP8_SWAP_AB_DOWN's bits);
#   2. decode_build_ab.py: MOE_FP8_MASKED_B_EVICT_FIRST 0 vs 1 (build), then MOE_FP8_SWAP_AB_DOWN
#      0 vs 1 (env), decode runners at 1 / 32 / 128 / 256 tokens, 3 interleaved rounds each;
#   3. compute-sanitizer racecheck of the smallest swap-AB GEMM test.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s16d; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  tests/test_layer_gpu.py -k "masked or swap_ab or decode or swiglu" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
OUT="$RAW" timeout 150 python3 benchmarks/decode_build_ab.py > "$RAW/evict_ab.log" 2>&1
echo "evict-first A/B (A: off, B: on) rc=$?"; grep -a "^{" "$RAW/evict_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/evict_first_ab.md" 2>/dev/null
OUT="$RAW" timeout 150 python3 benchmarks/decode_build_ab.py --a-defines "" \
  --b-env MOE_FP8_SWAP_AB_DOWN=1 > "$RAW/swap_ab.log" 2>&1
echo "swap-AB down A/B (A: off, B: on) rc=$?"; grep -a "^{" "$RAW/swap_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/swap_ab_down_ab.md" 2>/dev/null
timeout 180 compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q \
  -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k "test_masked_swap_ab and a_row_chunk=8" \
  > "$RAW/racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -aE "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$RAW/racecheck.log" | tail -n 2 | tr '\n' ' ')"
tar czf "$FINAL/s16d.tgz" -C "$RAW" . 2>/dev/null

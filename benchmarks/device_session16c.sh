#!/usr/bin/env bash
# Session 16, call 4 (~5 min): the swap-AB masked GEMM (include/swap_ab.cuh) on the GPU.
#   1. GPU tests: swap AB (every 16-row rounding, token tiles, few-SM grids, decode shapes) and
#      the other masked tests (their instances' SASS is unchanged but for register naming);
#   2. benchmarks/swap_ab_pair.py: down GEMM alone and the gate-up -> down chain, 1-256 tokens;
#   3. compute-sanitizer memcheck and racecheck of one swap-AB test.
# Logs under $OUT/s16c.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s16c; mkdir -p "$RAW" "$FINAL"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  -k "swap_ab or masked" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error|assert" "$RAW/tests.log" | head -n 12 | cut -c1-300
OUT="$RAW" timeout 200 python3 benchmarks/swap_ab_pair.py --rounds 3 > "$RAW/pair.log" 2>&1
echo "pair rc=$?"; grep -a "^{" "$RAW/pair.log" | cut -c1-900
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q \
    -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k "test_masked_swap_ab and num_sms" \
    > "$RAW/sanitize_$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE "ERROR SUMMARY|passed|failed" "$RAW/sanitize_$tool.log" | tail -n 2 | tr '\n' ' ')"
done
tar czf "$FINAL/s16c.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 16, call 5 (~5 min): MOE_FP8_SWAP_AB_DOWN in the layer.
#   1. device_switch_ab.sh: GPU tests with the switch on ("swap_ab": the GEMM tests and the decode
#      runner's bits), then the decode rows 1 / 8 / 32 / 128 / 256 tokens with it 0, 1, 0, 1;
#   2. compute-sanitizer racecheck of the smallest swap-AB GEMM test.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$FINAL"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$FINAL/precompile.log" 2>&1 || echo "precompile failed"
SWITCHES="MOE_FP8_SWAP_AB_DOWN MOE_FP8_SWAP_AB_DOWN" TESTS="swap_ab" DECODE_TOKENS=1,8,32,128,256 \
  bash benchmarks/device_switch_ab.sh
timeout 240 compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q \
  -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k "test_masked_swap_ab and a_row_chunk=8" \
  > "$FINAL/racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -aE "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$FINAL/racecheck.log" | tail -n 2 | tr '\n' ' ')"
tar czf "$FINAL/s16d.tgz" -C "$FINAL" switch_ab racecheck.log 2>/dev/null && rm -rf "$FINAL/switch_ab"

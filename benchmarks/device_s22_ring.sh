#!/usr/bin/env bash
# Session 22, call 2: ring staging (one-wave 128 x 256 tiles at 4 stages): GPU tests, sanitizer,
# interleaved A/B against 3 stages with a staging tile, the masked table at the new defaults.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
RAW=${OUT:-/tmp/s22}; mkdir -p "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  -k "ring or masked_targets or masked_uneven or dense_targets" > "$RAW/tests.log" 2>&1
echo "== tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q \
    -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k "masked_ring_staging and 128x256" \
    > "$RAW/san_$tool.log" 2>&1
  echo "== $tool rc=$? $(grep -a "ERROR SUMMARY" "$RAW/san_$tool.log" | tail -n 1)"
done
C=128x256s3c1d0,128x256s4c1d0w
timeout 200 python3 benchmarks/experiments/layout_rounds.py --configs $C --rounds 5 \
  --case masked:1x1024,4096,7168 --case masked:2x512,4096,7168 --case masked:4x256,4096,7168 \
  --case dense:1024,4096,7168 > "$RAW/rounds.log" 2>&1
echo "== rounds rc=$?"; grep -aE "^\|" "$RAW/rounds.log" | cut -c1-200
timeout 150 python3 benchmarks/bench_grouped.py --only masked > "$RAW/masked.log" 2>&1
echo "== masked rc=$?"; grep -aE "^\| (record|case)" "$RAW/masked.log" | cut -c1-250

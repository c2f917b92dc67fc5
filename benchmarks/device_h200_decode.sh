#!/usr/bin/env bash
# The first GPU call when an H200 comes (~5 min; fine on an H100 too): session 17's
# decode defaults (per-size graphs, the cp.async gather, the small dispatch's fill grid) and the
# wide masked tiles on the card they were never measured on.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_h200_decode.sh
#   1. GPU tests: the gather, the per-size graphs, masked 128 x 256;
#   2. decode_build_ab.py: the defaults (A) vs MOE_FP8_DECODE_GATHER=0 (B), 1 / 8 / 128 / 256 tokens;
#   3. the decode record (clean flush) with the 256-token runner's 1 / 3 / 100-token rows;
#   4. bench_grouped --only masked (record shapes at 128 x 256, decode rows).
# Everything under $OUT/s20.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s20; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  tests/test_layer_gpu.py -k "gather or batch_size or masked_uneven or masked_targets" \
  > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
OUT="$RAW" timeout 200 python3 benchmarks/decode_build_ab.py --tokens 1,8,128,256 \
  --b-env MOE_FP8_DECODE_GATHER=0 > "$RAW/gather_ab.log" 2>&1
echo "defaults (A) vs MOE_FP8_DECODE_GATHER=0 (B) rc=$?"; grep -a "^{" "$RAW/gather_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/gather_ab.md" 2>/dev/null
MOE_FP8_BENCH_FLUSH=clean OUT="$RAW" timeout 200 python3 benchmarks/bench_layer.py --decode-only \
  --no-peers --repeats 20 > "$RAW/decode.log" 2>&1
echo "decode rc=$?"; grep -aE "^\{" "$RAW/decode.log" | cut -c1-150
OUT="$RAW" timeout 150 python3 benchmarks/bench_grouped.py --only masked > "$RAW/grouped.log" 2>&1
echo "grouped rc=$?"; grep -aE "^\| (record|decode)" "$RAW"/grouped_masked_*.md | cut -c1-160
tar czf "$FINAL/s20.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 19, call 2 (~5 min, any Hopper card): direct stores (GemmConfig.direct_store: the bf16
# tile leaves from registers, so 128 x 256 tiles hold 4 ring stages instead of 3; call 1 showed
# 2 stages 7-14 % slower than 3).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session19.sh
#   1. GPU tests of the direct-store configs (bit identity with the staged tile on every NT
#      layout, pinned dense / contiguous / masked cases);
#   2. racecheck + memcheck of the bit-identity test;
#   3. experiments/layout_rounds.py, 5 interleaved rounds: staged s3 (today) vs direct s4 vs
#      direct s3 (the epilogue's own cost), dense M = 4096, contiguous and masked record shapes.
# Everything under $OUT/s19.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s19; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k \
  "direct_store or dense_pinned or zero_padding or multicast_pairs or offsets_form or masked_uneven" \
  > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
SAN="compute-sanitizer --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 20"
for tool in racecheck memcheck; do
  timeout 200 $SAN --tool $tool python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gemm_gpu.py -k direct_store_same_bits > "$RAW/$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE 'SUMMARY' "$RAW/$tool.log" | sort | uniq -c | tr '\n' ' ' | cut -c1-200)"
done
P=benchmarks/experiments/layout_rounds.py
timeout 200 python3 $P --configs 128x256s3c2d1,128x256s4c2d1w,128x256s3c2d1w \
  --case dense:4096,7168,2048 --case dense:4096,4096,7168 --case dense:4096,24576,1536 \
  --case dense:4096,7168,16384 --case dense:4096,32768,512 > "$RAW/rounds_dense.md" 2>&1
echo "dense rc=$?"; grep -a "^| dense" "$RAW/rounds_dense.md" | cut -c1-160
timeout 60 python3 $P --configs 128x192s4c1d1,128x192s5c1d1w --case dense:4096,2112,7168 \
  > "$RAW/rounds_dense192.md" 2>&1
echo "dense 192 rc=$?"; grep -a "^| dense" "$RAW/rounds_dense192.md" | cut -c1-160
timeout 200 python3 $P --configs 128x256s3c2d1,128x256s4c2d1w \
  --case contiguous:4x8192,4096,7168 --case contiguous:4x8192,7168,2048 \
  --case contiguous:8x4096,4096,7168 --case contiguous:8x4096,7168,2048 > "$RAW/rounds_contiguous.md" 2>&1
echo "contiguous rc=$?"; grep -a "^| contig" "$RAW/rounds_contiguous.md" | cut -c1-160
timeout 100 python3 $P --configs 128x256s3c1d1,128x256s4c1d1w --rounds 3 \
  --case masked:1x1024,4096,7168 --case masked:2x512,4096,7168 --case masked:4x256,4096,7168 \
  --case masked:1x1024,7168,2048 --case masked:2x512,7168,2048 --case masked:4x256,7168,2048 \
  > "$RAW/rounds_masked.md" 2>&1
echo "masked rc=$?"; grep -a "^| masked" "$RAW/rounds_masked.md" | cut -c1-160
tar czf "$FINAL/s19.tgz" -C "$RAW" . 2>/dev/null

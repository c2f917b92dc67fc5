#!/usr/bin/env bash
# Session 19, call 1 (~5 min, any Hopper card): the 128 x 256 tiles' lookahead (gemm_core.cuh
# kWideLookahead: the next tile's first half-group queued before the epilogue; double_buffer=0
# pins the old order) and the ring-depth question for the same tiles (3 vs 2 stages).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session19.sh
#   1. GPU tests of every 128 x 256 path (dense, contiguous incl. zero padding and multicast pairs,
#      masked, the fused SwiGLU beside it) and the new bit-identity test;
#   2. racecheck + memcheck of the bit-identity test (few SMs: every CTA walks many tiles);
#   3. experiments/layout_rounds.py, 5 interleaved rounds: d0 (old) vs d1 (lookahead) vs d1 at 2
#      stages, dense M = 4096 shapes, the contiguous and masked record shapes.
# Everything under $OUT/s19.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s19; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k \
  "wide_lookahead or dense_pinned or zero_padding or multicast_pairs or dense_targets or contiguous_targets or masked_targets or masked_uneven or contiguous_swiglu or repeatable" \
  > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
SAN="compute-sanitizer --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 20"
for tool in racecheck memcheck; do
  timeout 200 $SAN --tool $tool python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gemm_gpu.py -k wide_lookahead > "$RAW/$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE 'SUMMARY' "$RAW/$tool.log" | sort | uniq -c | tr '\n' ' ' | cut -c1-200)"
done
P=benchmarks/experiments/layout_rounds.py
timeout 200 python3 $P --configs 128x256s3c2d0,128x256s3c2d1,128x256s2c2d1 \
  --case dense:4096,7168,2048 --case dense:4096,4096,7168 --case dense:4096,24576,1536 \
  --case dense:4096,7168,16384 --case dense:4096,32768,512 > "$RAW/rounds_dense.md" 2>&1
echo "dense rc=$?"; grep -a "^| dense" "$RAW/rounds_dense.md" | cut -c1-160
timeout 200 python3 $P --configs 128x256s3c2d0,128x256s3c2d1 \
  --case contiguous:4x8192,4096,7168 --case contiguous:4x8192,7168,2048 \
  --case contiguous:8x4096,4096,7168 --case contiguous:8x4096,7168,2048 > "$RAW/rounds_contiguous.md" 2>&1
echo "contiguous rc=$?"; grep -a "^| contig" "$RAW/rounds_contiguous.md" | cut -c1-160
timeout 100 python3 $P --configs 128x256s3c1d0,128x256s3c1d1 --rounds 3 \
  --case masked:1x1024,4096,7168 --case masked:4x256,7168,2048 > "$RAW/rounds_masked.md" 2>&1
echo "masked rc=$?"; grep -a "^| masked" "$RAW/rounds_masked.md" | cut -c1-160
tar czf "$FINAL/s19.tgz" -C "$RAW" . 2>/dev/null

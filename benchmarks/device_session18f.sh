#!/usr/bin/env bash
# Session 18, call 6 (~4 min): masked split K with its claims one unit ahead and every consuming lane
# arriving on the unit ring (fix-up on producer warp 2 as in call 5; the math warps
# only store their partials): the split tests, compute-sanitizer memcheck / racecheck of a
# few-SM split test, tile_trace.py at S = 0 / 4 / 2, and decode_build_ab.py S = 4 and S = 2 (A)
# vs off (B) at 1 / 8 / 32 tokens (only the down GEMM splits now).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18f; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  tests/test_layer_gpu.py -k "split_k" > "$RAW/tests.log" 2>&1
echo "split tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|^E  " "$RAW/tests.log" | head -n 8 | cut -c1-250
SAN="compute-sanitizer --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 50"
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=$([ $tool = memcheck ] && echo 1 || echo 0) timeout 120 \
    $SAN --tool $tool python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
    -k "test_masked_split_k and (s2_early_sm5 or n48_s8_sm3)" > "$RAW/$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE 'SUMMARY' "$RAW/$tool.log" | tail -n 1) $(tail -n 1 "$RAW/$tool.log" | cut -c1-60)"
done
for s in 0 4 2; do
  MOE_FP8_MASKED_SPLIT_K=$s OUT="$RAW" timeout 150 python3 benchmarks/tile_trace.py --tiles 64 \
    > "$RAW/trace_s$s.log" 2>&1
  echo "trace split=$s rc=$?"; grep -a "^{" "$RAW/trace_s$s.log" | head -n 3 | cut -c1-330
  rm -f "$RAW"/tile_trace_2026*.md
done
for s in 4 2; do
  OUT="$RAW" timeout 150 python3 benchmarks/decode_build_ab.py --tokens 1,8 \
    --a-env MOE_FP8_MASKED_SPLIT_K=$s --max-diff 1e-4 > "$RAW/split${s}_ab.log" 2>&1
  echo "split $s (A) vs off (B) rc=$?"; grep -a "^{" "$RAW/split${s}_ab.log" | cut -c1-300
  mv "$RAW"/decode_build_ab_2026*.md "$RAW/split${s}_ab.md" 2>/dev/null
done
tar czf "$FINAL/s18f.tgz" -C "$RAW" . 2>/dev/null

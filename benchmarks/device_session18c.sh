#!/usr/bin/env bash
# Session 18, call 3 (~3 min): why masked split K lost (call 2: +36 us at one token): the split
# GEMM tests after the column guard, then tile_trace.py (per-unit stamps) of the decode masked
# GEMMs without split, with MOE_FP8_MASKED_SPLIT_K=4 and =2.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18c; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  -k "split_k" > "$RAW/tests.log" 2>&1
echo "gemm tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 8 | cut -c1-250
for s in 0 4 2; do
  MOE_FP8_MASKED_SPLIT_K=$s OUT="$RAW" timeout 150 python3 benchmarks/tile_trace.py --tiles 64 \
    > "$RAW/trace_s$s.log" 2>&1
  echo "trace split=$s rc=$?"
  grep -a "^{\|streaming" "$RAW/trace_s$s.log" | head -n 4 | cut -c1-400
  mv "$RAW"/tile_trace_*.md "$RAW/tile_trace_s$s.md" 2>/dev/null
done
tar czf "$FINAL/s18c.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 18, call 4 (~6 min): the GEMM and layer GPU test files whole; masked split K with
# commit; masked split K with the one-instruction acq_rel count: tile_trace.py without split, at
# S = 4 and 2, and decode_build_ab.py S = 2 (A) vs off (B) at 1 / 8 tokens.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18d; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
for f in gemm layer; do
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_${f}_gpu.py \
    > "$RAW/tests_$f.log" 2>&1
  echo "$f tests rc=$? $(tail -n 1 "$RAW/tests_$f.log" | cut -c1-120)"
  grep -aE "^FAILED" "$RAW/tests_$f.log" | head -n 8 | cut -c1-250
done
for s in 0 4 2; do
  MOE_FP8_MASKED_SPLIT_K=$s OUT="$RAW" timeout 150 python3 benchmarks/tile_trace.py --tiles 64 \
    > "$RAW/trace_s$s.log" 2>&1
  echo "trace split=$s rc=$?"
  grep -a "^{" "$RAW/trace_s$s.log" | head -n 2 | cut -c1-330
  mv "$RAW"/tile_trace_*.md "$RAW/tile_trace_s$s.md" 2>/dev/null
done
OUT="$RAW" timeout 120 python3 benchmarks/decode_build_ab.py --tokens 1,8 \
  --a-env MOE_FP8_MASKED_SPLIT_K=2 --max-diff 1e-4 > "$RAW/split2_ab.log" 2>&1
echo "split 2 (A) vs off (B) rc=$?"; grep -a "^{" "$RAW/split2_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/split2_ab.md" 2>/dev/null
tar czf "$FINAL/s18d.tgz" -C "$RAW" . 2>/dev/null

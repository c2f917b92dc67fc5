#!/usr/bin/env bash
# Session 17, call 8 (~6 min, an H200): the session's defaults on the other card.
#   1. decode_build_ab.py: the defaults (gather up to 64-row tiles) vs MOE_FP8_DECODE_GATHER=0;
#   2. the decode record (clean flush) with the per-size graphs' rows;
#   3. bench_grouped (contiguous and masked: the wide masked tiles);
#   4. bench_train --quick (forward + backward vs bf16, the wgrad GEMM) and bench_wgrad.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s17g; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
OUT="$RAW" timeout 150 python3 benchmarks/decode_build_ab.py --tokens 1,8,32,128 \
  --b-env MOE_FP8_DECODE_GATHER=0 > "$RAW/gather_default_ab.log" 2>&1
echo "defaults (A) vs MOE_FP8_DECODE_GATHER=0 (B) rc=$?"; grep -a "^{" "$RAW/gather_default_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/gather_default_ab.md" 2>/dev/null
MOE_FP8_BENCH_FLUSH=clean OUT="$RAW" timeout 150 python3 benchmarks/bench_layer.py --decode-only \
  --no-peers --repeats 20 > "$RAW/decode.log" 2>&1
echo "decode rc=$?"; grep -aE "^\{" "$RAW/decode.log" | cut -c1-140
OUT="$RAW" timeout 150 python3 benchmarks/bench_grouped.py > "$RAW/grouped.log" 2>&1
echo "grouped rc=$?"; grep -aE "^\| (record|32 exp)|geomean" "$RAW"/grouped_*.md | cut -c1-170
OUT="$RAW" timeout 150 python3 benchmarks/bench_train.py --quick --no-profile > "$RAW/train.log" 2>&1
echo "train rc=$?"; grep -aE "^\| " "$RAW"/train_2*.md | cut -c1-170
OUT="$RAW" timeout 90 python3 benchmarks/bench_wgrad.py > "$RAW/wgrad.log" 2>&1
echo "wgrad rc=$?"; grep -aE "^\| " "$RAW"/*wgrad*.md | cut -c1-170
tar czf "$FINAL/s17g.tgz" -C "$RAW" . 2>/dev/null

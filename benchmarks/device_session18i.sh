#!/usr/bin/env bash
# Session 18, call 9 (~3 min): issue 7's weight-gradient GEMM with wider tiles (128 x 192 / 160,
# single-buffered) beside the 128 x 128 variants: bench_wgrad.py --sweep.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18i; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
OUT="$RAW" timeout 400 python3 benchmarks/bench_wgrad.py --sweep > "$RAW/wgrad.log" 2>&1
echo "bench_wgrad rc=$?"
for f in "$RAW"/wgrad_2026*.md "$RAW"/wgrad_sweep_2026*.md; do
  grep -aE "^\| " "$f" | awk -F'|' '{print $2,"|",$3,$4,$5,"|",$6,"|",$7,$8,$9}' | cut -c1-150
done
tar czf "$FINAL/s18i.tgz" -C "$RAW" . 2>/dev/null

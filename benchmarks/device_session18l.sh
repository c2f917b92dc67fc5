#!/usr/bin/env bash
# Session 18, call 12 (~1 min): is the weight-gradient GEMM bound by its ring depth? The default
# (128 x 192, 3 stages) against 2 stages, and 128 x 128 at 4 / 3 / 2 stages, interleaved rounds.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18l; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
OUT="$RAW" timeout 300 python3 benchmarks/experiments/wgrad_width_probe.py --rounds 5 \
  --configs 128x192s2c2d1,128x128s4c2d1,128x128s3c2d1,128x128s2c2d1 > "$RAW/probe.log" 2>&1
echo "probe rc=$?"; grep -a "^{" "$RAW/probe.log" | cut -c1-200
tar czf "$FINAL/s18l.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 18, call 10 (~2 min): the weight-gradient GEMM at 128 x 192 / 160 against the default,
# interleaved rounds (experiments/wgrad_width_probe.py).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18j; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
OUT="$RAW" timeout 300 python3 benchmarks/experiments/wgrad_width_probe.py --rounds 5 \
  > "$RAW/probe.log" 2>&1
echo "probe rc=$?"; grep -a "^{" "$RAW/probe.log" | cut -c1-200
tar czf "$FINAL/s18j.tgz" -C "$RAW" . 2>/dev/null

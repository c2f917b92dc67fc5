#!/usr/bin/env bash
# Session 18, call 14 (~1 min): is the large-M NT GEMM (128 x 256, B multicast, 3 stages) bound
# by its ring depth as the weight-gradient GEMM is? gemm_ab.py at 3 vs 2 stages.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18n; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 150 python3 benchmarks/gemm_ab.py --variant head=moe_fp8/gemm/include --rounds 5 \
  --shape 4096,7168,2048 --shape 4096,4096,7168 --shape 4096,24576,1536 \
  --config 128x256s3c2d0 --config 128x256s2c2d0 --config 128x128s5c2d1 --config 128x128s3c2d1 \
  > "$RAW/gemm_ab.md" 2>&1
echo "gemm_ab rc=$?"; grep -a "^| [0-9]" "$RAW/gemm_ab.md" | cut -c1-110
cp "$RAW/gemm_ab.md" "$FINAL/gemm_ab_stages.md"

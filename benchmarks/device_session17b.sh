#!/usr/bin/env bash
# Session 17, call 2 (~4 min, an H100): is a small-M GEMM bound per SM or per card?
#   1. experiments/per_sm_stream.py: 64 x N x 16384 on 64 x 64 tiles, N = 1024 ... 16896 (16 ...
#      264 tiles), stages 4 / 6 / 10 at N = 7168, K = 2048 at three N;
#   2. the decode record at the defaults (clean flush), for issue 5's H100 rows.
# Everything under $OUT/s17b.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s17b; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 240 python3 benchmarks/experiments/per_sm_stream.py > "$RAW/per_sm_stream.log" 2>&1
echo "per_sm_stream rc=$?"; grep -aE "^\||card" "$RAW/per_sm_stream.log" | cut -c1-160
MOE_FP8_BENCH_FLUSH=clean OUT="$RAW" timeout 240 python3 benchmarks/bench_layer.py --decode-only \
  --no-peers --repeats 20 > "$RAW/decode.log" 2>&1
echo "decode rc=$?"; grep -aE "^\{" "$RAW/decode.log" | cut -c1-200
tar czf "$FINAL/s17b.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 19, call 3 (~3 min on an H100, ~6 on an H200): the gather's proxy fence once per K block
# (build macro MOE_FP8_EXP_GATHER_FENCE_ONCE; the shipped build fences before both halves of a
# 256-wide tile) in decode_build_ab.py, bits compared; on an H200 also the decode record and the
# gather A/B (session 17's defaults were never measured there).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session19.sh
# Everything under $OUT/s19.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s19; mkdir -p "$FINAL" "$RAW"
gpu=$(nvidia-smi --query-gpu=name,power.limit --format=csv,noheader | head -n 1); echo "$gpu"
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
OUT="$RAW" timeout 240 python3 benchmarks/decode_build_ab.py --tokens 1,8,32,128,256 \
  --b-defines MOE_FP8_EXP_GATHER_FENCE_ONCE=1 > "$RAW/fence_ab.log" 2>&1
echo "fence A/B rc=$?"; grep -a "^{" "$RAW/fence_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/fence_ab.md" 2>/dev/null
if [[ "$gpu" == *H200* ]]; then
  MOE_FP8_BENCH_FLUSH=clean OUT="$RAW" timeout 200 python3 benchmarks/bench_layer.py --decode-only \
    --no-peers --repeats 20 > "$RAW/decode.log" 2>&1
  echo "decode rc=$?"; grep -aE "^\{" "$RAW/decode.log" | cut -c1-150
  OUT="$RAW" timeout 150 python3 benchmarks/decode_build_ab.py --tokens 1,8,128,256 \
    --b-env MOE_FP8_DECODE_GATHER=0 > "$RAW/gather_ab.log" 2>&1
  echo "gather on (A) vs off (B) rc=$?"; grep -a "^{" "$RAW/gather_ab.log" | cut -c1-300
fi
tar czf "$FINAL/s19.tgz" -C "$RAW" . 2>/dev/null

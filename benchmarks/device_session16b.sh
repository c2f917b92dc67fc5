#!/usr/bin/env bash
# Session 16, call 2 (~6 min): where the 256-token decode step's time goes now, and the cheap
# levers on its router window without new code.
#   1. profile_layer's decode graph timelines at 256 and 1 tokens (the layer's defaults);
#   2. decode rows 1 / 32 / 256 tokens (clean flush) under the defaults and three settings:
#      MOE_FP8_DECODE_ROUTER_SMS=64 and 0, MOE_FP8_OVERLAP_SHARED=0; two interleaved rounds.
# Everything lands in $OUT/s16b.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s16b; mkdir -p "$RAW" "$FINAL"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
for n in 256 1; do
  OUT="$RAW" timeout 120 python3 benchmarks/profile_layer.py --tokens --decode $n --mode nosync \
    > "$RAW/profile_decode$n.log" 2>&1
  echo "== profile decode $n rc=$?"
  grep -aE "^\| " "$RAW/profile_decode$n.log" | grep -v "^|--" | sed -n '/start/,$p' | cut -c1-110 | head -n 40
done
for round in 1 2; do
  for setting in default MOE_FP8_DECODE_ROUTER_SMS=64 MOE_FP8_DECODE_ROUTER_SMS=0 MOE_FP8_OVERLAP_SHARED=0; do
    d="$RAW/ab_${setting}_r$round"; mkdir -p "$d"
    env $( [ "$setting" = default ] || echo "$setting" ) OUT="$d" timeout 150 python3 \
      benchmarks/bench_layer.py --decode-only --repeats 5 --no-peers --decode-tokens 1,32,256 \
      > "$d/log" 2>&1
    echo "== $setting round $round rc=$?"
    grep -aE "^\| [0-9]" "$d/log" | cut -c1-80
  done
done
tar czf "$FINAL/s16b.tgz" -C "$RAW" . 2>/dev/null

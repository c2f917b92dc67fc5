#!/usr/bin/env bash
# Session 23's second call: on an H200 first issue 5's decode rows (device_h200_decode.sh); then
# the B L2-prefetch switch on the masked record shapes (and one dense / contiguous shape), bits
# compared with the switch off.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=/tmp/moe_fp8_cache
O=${OUT:-/tmp/out}; mkdir -p "$O"
G=$(nvidia-smi --query-gpu=name,power.limit --format=csv,noheader); echo "$G"
[[ "$G" == *H200* ]] && timeout 330 bash benchmarks/device_h200_decode.sh
cases=""; for c in 1x1024,4096,7168 1x1024,7168,2048 2x512,4096,7168 2x512,7168,2048 \
  4x256,4096,7168 4x256,7168,2048; do cases="$cases --case masked:$c"; done
timeout 200 python3 benchmarks/experiments/layout_rounds.py --rounds 4 $cases \
  --case dense:4096,4096,7168 --case contiguous:4x8192,7168,2048 \
  --configs auto,auto+MOE_FP8_B_PREFETCH=4,auto+MOE_FP8_B_PREFETCH=8 > "$O/prefetch.log" 2>&1
echo "prefetch rc=$?"; grep -a "^|" "$O/prefetch.log" | cut -c1-160

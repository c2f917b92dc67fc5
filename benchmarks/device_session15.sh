#!/usr/bin/env bash
# Session 15's first device call (NOTES "Where the next session starts", end of session 14), in
# the order of what matters most, each step under a time limit; ~5 minutes on an H100.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session15.sh
#   1. the two decode switches built in session 14 (GPU bits tests, then decode rows 0 / on):
#      MOE_FP8_STAGE_QUANT, MOE_FP8_DECODE_PREFETCH at 4 and 8 K blocks;
#   2. power_probe.py: ours vs cuBLAS per clock and per watt (the contiguous K = 7168 question);
#   3. the contiguous table with pinned configs under with_clocks.sh.
# Logs and tables under $OUT (switch_ab.tgz, power_probe_*, contiguous/).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUT=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$OUT/precompile.log" 2>&1 || echo "precompile failed"
SWITCHES="MOE_FP8_STAGE_QUANT MOE_FP8_DECODE_PREFETCH:4 MOE_FP8_DECODE_PREFETCH:8" \
  TESTS="stage_quant or prefetch" DECODE_TOKENS=1,8,32,256 OUT="$OUT" \
  timeout 330 bash benchmarks/device_switch_ab.sh
tar -czf "$OUT/switch_ab.tgz" -C "$OUT" switch_ab && rm -rf "$OUT/switch_ab"
OUT="$OUT" timeout 150 python3 benchmarks/power_probe.py --seconds 2 > "$OUT/power_probe.log" 2>&1
echo "== power_probe rc=$?"; grep -a "^{" "$OUT/power_probe.log" | cut -c1-260
mkdir -p "$OUT/contiguous"
CLOCKS_CSV="$OUT/contiguous/clocks.csv" OUT="$OUT/contiguous" timeout 150 \
  bash benchmarks/with_clocks.sh python3 benchmarks/bench_grouped.py --only contiguous \
  --contiguous-configs 128x128c1d1,128x192c1d1,128x256s4c1d1,128x160c1d1 \
  > "$OUT/contiguous/log" 2>&1
echo "== contiguous rc=$?"; grep -aE "^\| record|clocks:" "$OUT/contiguous/log" | cut -c1-260

#!/usr/bin/env bash
# The next session's first GPU call (NOTES "Where the next session starts", end of session 15),
# ~5 minutes on an H100, each step under a time limit, the clocks sampled around each table:
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session16.sh
#   1. the record list (bench_layer: prefill in interleaved rounds of ours and the peers, decode);
#   2. the dense table (bench_gemm; 4096 x 2112 x 7168 now on 128 x 192 tiles);
#   3. power_probe on the dense shapes below cuBLAS or near it, with 128 x 256 tiles pinned beside.
# Logs and tables under $OUT (record/, gemm/, power_probe_*).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUT=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$OUT/precompile.log" 2>&1 || echo "precompile failed"
table() {  # table NAME TIMEOUT_S CMD...: run CMD under with_clocks.sh into $OUT/NAME
  local name=$1 limit=$2; shift 2; mkdir -p "$OUT/$name"
  CLOCKS_CSV="$OUT/$name/clocks.csv" OUT="$OUT/$name" timeout "$limit" \
    bash benchmarks/with_clocks.sh "$@" > "$OUT/$name/log" 2>&1
  echo "== $name rc=$?"
  grep -aE "^\| [0-9]|geomean|Geometric|clocks:" "$OUT/$name/log" | sort -u | cut -c1-170
}
table record 240 python3 benchmarks/bench_layer.py
table gemm 120 python3 benchmarks/bench_gemm.py
OUT="$OUT" timeout 90 python3 benchmarks/power_probe.py --seconds 2 --cases dense \
  --dense-shapes "4096,2112,7168;128,32768,512" --configs 128x256c1d1 > "$OUT/power_probe.log" 2>&1
echo "== power_probe rc=$?"; grep -a "^{" "$OUT/power_probe.log" | cut -c1-220

#!/usr/bin/env bash
# Session 18, call 8 (~5 min): issue 3's dense shapes below or near 1.0x cuBLAS on the H100
# (128 x 32768 x 512 0.98x, 4096 x 2112 x 7168 0.95x in session 14): pinned configs with
# gemm_ab.py (3 rounds of L2-flushed graph replays), then the dense table (bench_gemm.py) at HEAD.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18h; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
shapes=""; for s in 128,32768,512 64,32768,512 128,24576,1536 128,7168,2048 4096,2112,7168; do
  shapes="$shapes --shape $s"; done
configs=""; for c in auto 128x256c1d0 128x128c1d1a2 128x256c1d0a2 64x256c1d0 64x128c1d1a2; do
  configs="$configs --config $c"; done
timeout 240 python3 benchmarks/gemm_ab.py --variant head=moe_fp8/gemm/include $shapes $configs \
  > "$RAW/gemm_ab.md" 2>&1
echo "gemm_ab rc=$?"; grep -a "^| [0-9]" "$RAW/gemm_ab.md" | cut -c1-110
OUT="$RAW" timeout 300 python3 benchmarks/bench_gemm.py > "$RAW/bench_gemm.log" 2>&1
echo "bench_gemm rc=$?"; tail -n 3 "$RAW/bench_gemm.log" | cut -c1-200
grep -aE "^\| (64|128|4096) \|" "$RAW"/gemm_2026*.md | awk -F'|' '{print $2,$3,$4,$5,$7,$14,$15}' | head -20
tar czf "$FINAL/s18h.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Raster band width (GemmConfig.group_n) for the 128 x 256 B-multicast tiles (~5 min): DRAM reads
# of the shipped band (16 n blocks) were 3.4x the operands' bytes at 4096 x 7168 x 16384 (ncu,
# session 20), and memory traffic is what the card's power goes to beyond the MMAs.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_raster.sh
#   1. ncu at the base clock: DRAM / L2 bytes and time for g16 / g8 / g4 (two dense shapes);
#   2. power_probe at the cap: dense and contiguous, shipped vs g8 / g4, cuBLAS beside;
#   3. gemm_ab (L2 flushed, 5 interleaved rounds): the four large dense shapes.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/raster; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
bands="g8=cfg:128x256c2d0g8 g4=cfg:128x256c2d0g4"
OUT="$RAW" timeout 150 bash benchmarks/ncu_vs_cublas.sh 4096 7168 16384 $bands | grep -E "^\| (metric|---|dram|gpu__time|lts__t_sector_hit|lts__t_sectors_srcunit_tex.sum|sm__cycles_elapsed.avg)"
OUT="$RAW" timeout 120 bash benchmarks/ncu_vs_cublas.sh 4096 4096 7168 $bands | grep -E "^\| (metric|---|dram|gpu__time|lts__t_sector_hit|lts__t_sectors_srcunit_tex.sum|sm__cycles_elapsed.avg)"
OUT="$RAW" timeout 240 python3 benchmarks/power_probe.py --cases dense,contiguous --seconds 2 \
  --rounds 2 --configs 128x256c2d0g8,128x256c2d0g4 > "$RAW/power.log" 2>&1
echo "power_probe rc=$?"; grep -aE "^\|" "$RAW"/power_probe_*.md | cut -c1-200
OUT="$RAW" timeout 150 python3 benchmarks/gemm_ab.py --variant head=moe_fp8/gemm/include --rounds 5 \
  --config 128x256c2d0 --config 128x256c2d0g8 --config 128x256c2d0g4 --shape 4096,4096,7168 \
  --shape 4096,7168,16384 --shape 4096,7168,2048 --shape 4096,24576,1536 > "$RAW/raster_ab.md" 2>&1
echo "gemm_ab rc=$?"; grep -a "^|" "$RAW/raster_ab.md" | cut -c1-150
tar czf "$FINAL/raster.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Where the large-M GEMM's energy goes (~2 min): at the 700 W cap time follows energy per FLOP.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_energy.sh
#   1. ncu at the base clock, ours vs cuBLAS blockwise (+ the nopromo / noepi ablations at
#      4096 x 4096 x 7168): per-clock tensor share, instructions, bytes at each level;
#   2. power_probe at the cap: ours (shipped, and 128 x 256 without multicast) and the ablations
#      nopromo / noepi / noload (no multicast) vs cuBLAS, back to back, 2 rounds.
# Everything under $OUT/energy.tgz; the tables on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/energy; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
python3 benchmarks/ab_variants.py /tmp/abv > /dev/null || echo "ab_variants failed"
abl="nopromo=/tmp/abv/nopromo noepi=/tmp/abv/noepi"
OUT="$RAW" timeout 240 bash benchmarks/ncu_vs_cublas.sh 4096 4096 7168 $abl
OUT="$RAW" timeout 150 bash benchmarks/ncu_vs_cublas.sh 4096 7168 16384
OUT="$RAW" timeout 200 python3 benchmarks/power_probe.py --cases dense --seconds 2 --rounds 2 \
  --dense-shapes "4096,4096,7168;4096,7168,16384" --configs 128x256c1d0 \
  --variant nopromo=/tmp/abv/nopromo --variant noepi=/tmp/abv/noepi \
  --variant noload=/tmp/abv/noload > "$RAW/power.log" 2>&1
echo "power_probe rc=$?"
grep -aE "^\|" "$RAW"/power_probe_*.md | cut -c1-200
tar czf "$FINAL/energy.tgz" -C "$RAW" . 2>/dev/null

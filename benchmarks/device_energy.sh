#!/usr/bin/env bash
# Where the large-M GEMM's energy goes (~4 min): at the 700 W cap time follows energy per FLOP.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_energy.sh
#   1. ncu at the base clock, ours vs cuBLAS blockwise (+ the nopromo / noepi ablations at
#      4096 x 4096 x 7168): per-clock tensor share, instructions, bytes at each level;
#   2. power_probe at the cap: ours (shipped, and 128 x 256 without multicast) and the ablations
#      nopromo / noepi / noload (no multicast) vs cuBLAS, back to back, 2 rounds;
#   3. experiment `areg` (MOE_FP8_EXP_WIDE_A_REGS: the 256-wide tile's A from registers) against
#      the tree as it is: gemm_ab (L2-flushed, 5 interleaved rounds, bits compared) and at the cap.
# Everything under $OUT/energy.tgz; the tables on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/energy; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
python3 benchmarks/ab_variants.py /tmp/abv > /dev/null || echo "ab_variants failed"
rm -rf /tmp/areg && cp -r moe_fp8/gemm/include /tmp/areg
sed -i '1i #define MOE_FP8_EXP_WIDE_A_REGS 1' /tmp/areg/fp8_gemm.cuh
OUT="$RAW" timeout 200 python3 benchmarks/gemm_ab.py --variant head=moe_fp8/gemm/include \
  --variant areg=/tmp/areg --rounds 5 --config 128x256c2d0 --shape 4096,4096,7168 \
  --shape 4096,7168,16384 --shape 4096,7168,2048 --shape 4096,24576,1536 > "$RAW/areg_ab.md" 2>&1
echo "gemm_ab areg rc=$?"; cat "$RAW/areg_ab.md" | grep -a "^|" | cut -c1-150
abl="nopromo=/tmp/abv/nopromo noepi=/tmp/abv/noepi areg=/tmp/areg"
OUT="$RAW" timeout 240 bash benchmarks/ncu_vs_cublas.sh 4096 4096 7168 $abl
OUT="$RAW" timeout 150 bash benchmarks/ncu_vs_cublas.sh 4096 7168 16384
OUT="$RAW" timeout 200 python3 benchmarks/power_probe.py --cases dense --seconds 2 --rounds 2 \
  --dense-shapes "4096,4096,7168;4096,7168,16384" --configs 128x256c1d0 \
  --variant nopromo=/tmp/abv/nopromo --variant noepi=/tmp/abv/noepi \
  --variant noload=/tmp/abv/noload --variant areg=/tmp/areg > "$RAW/power.log" 2>&1
echo "power_probe rc=$?"
grep -aE "^\|" "$RAW"/power_probe_*.md | cut -c1-200
tar czf "$FINAL/energy.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 23's first call, most wanted first (the call may be cut at 600 s; logs under $OUT):
# the shipped evict-first stores and the fp32 256-wide passes (tests), the weight-gradient
# ablations (ab_variants: colonefma / colnopromo / ordered), the width A/B (accumulate,
# overwrite), bench_wgrad, the store probe.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=/tmp/moe_fp8_cache
O=${OUT:-/tmp/out}; mkdir -p "$O"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  tests/test_layer_train.py > "$O/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$O/tests.log" | cut -c1-150)"; grep -a "^FAILED" "$O/tests.log" | head
python3 benchmarks/ab_variants.py .variants > /dev/null
timeout 170 python3 benchmarks/experiments/wgrad_ab.py --rounds 3 --variant head=moe_fp8/gemm/include \
  --variant onefma=.variants/colonefma --variant nopromo=.variants/colnopromo \
  --variant ordered=.variants/ordered > "$O/ab.log" 2>&1
echo "ab rc=$?"; grep -a "^|" "$O/ab.log" | grep -v "^|--" | cut -c1-150
for mode in "" "--overwrite"; do
  OUT="$O" timeout 120 python3 benchmarks/experiments/wgrad_width_probe.py --rounds 3 --uneven \
    --configs 128x256s3c2d1 $mode > "$O/width$mode.log" 2>&1
  echo "width $mode rc=$?"; grep -a "^{" "$O/width$mode.log" | cut -c1-230
done
OUT="$O" MOE_FP8_BENCH_FLUSH=write timeout 170 python3 benchmarks/bench_wgrad.py > "$O/wgrad.log" 2>&1
echo "wgrad rc=$?"; grep -aE "^\|" "$O/wgrad.log" | cut -c1-250 | tail -6
OUT="$O" timeout 100 python3 benchmarks/experiments/wgrad_store_probe.py > "$O/store.log" 2>&1
echo "store rc=$?"; grep -aE "^\{|^\|" "$O/store.log" | cut -c1-200 | tail -14

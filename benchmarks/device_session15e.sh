#!/usr/bin/env bash
# Session 15, last GPU calls: the defaults after the flips (contiguous B multicast, the prefill's
# fused SwiGLU): the layer's GPU tests (SKIP_TESTS=1: none), the contiguous table (default = B
# multicast, beside the pinned 128 x 256 without it; CONTIGUOUS=1), then the record list, each
# under with_clocks.sh.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session15e.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUT=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$OUT/precompile.log" 2>&1 || echo "precompile failed"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layer_gpu.py \
    tests/test_layer_train.py > "$OUT/tests_layer.log" 2>&1
  echo "== layer tests rc=$? $(tail -n 1 "$OUT/tests_layer.log" | cut -c1-120)"
  grep -aE "^FAILED" "$OUT/tests_layer.log" | head -n 6 | cut -c1-250
fi
if [ "${CONTIGUOUS:-0}" = 1 ]; then
  mkdir -p "$OUT/contiguous"
  CLOCKS_CSV="$OUT/contiguous/clocks.csv" OUT="$OUT/contiguous" timeout 150 bash \
    benchmarks/with_clocks.sh python3 benchmarks/bench_grouped.py --only contiguous \
    --contiguous-configs 128x256c1d1 > "$OUT/contiguous/log" 2>&1
  echo "== contiguous rc=$?"; grep -aE "^\| |clocks" "$OUT/contiguous/log" | cut -c1-260
fi
mkdir -p "$OUT/record"
CLOCKS_CSV="$OUT/record/clocks.csv" OUT="$OUT/record" timeout 240 bash benchmarks/with_clocks.sh \
  python3 benchmarks/bench_layer.py > "$OUT/record/log" 2>&1
echo "== record rc=$?"
grep -aE "^\| [0-9]|geomean|clocks" "$OUT/record/log" | sort -u | cut -c1-140

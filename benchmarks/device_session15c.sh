#!/usr/bin/env bash
# Session 15, third GPU call: contiguous B multicast on by default (kContiguousMulticastDefault).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session15c.sh
#   1. GPU tests at the defaults: the GEMM's contiguous / multicast tests, layer, layer training;
#   2. bench_train --quick with MOE_FP8_CONTIGUOUS_MULTICAST 0 / 1, two interleaved rounds;
#   3. the record list (bench_layer, prefill and decode with peers) under with_clocks.sh.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUT=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$OUT/precompile.log" 2>&1 || echo "precompile failed"
PYTEST="python3 -m pytest -q -p no:cacheprovider -m gpu"
timeout 120 $PYTEST tests/test_gemm_gpu.py -k "multicast or contiguous" > "$OUT/tests_gemm.log" 2>&1
echo "== gemm tests rc=$? $(tail -n 1 "$OUT/tests_gemm.log" | cut -c1-120)"
timeout 120 $PYTEST tests/test_layer_gpu.py tests/test_layer_train.py > "$OUT/tests_layer.log" 2>&1
echo "== layer tests rc=$? $(tail -n 1 "$OUT/tests_layer.log" | cut -c1-120)"
grep -aE "^FAILED" "$OUT"/tests_*.log | head -n 6 | cut -c1-250
for round in 1 2; do
  for v in 0 1; do
    mkdir -p "$OUT/train-$v-$round"
    OUT="$OUT/train-$v-$round" MOE_FP8_CONTIGUOUS_MULTICAST=$v timeout 120 python3 \
      benchmarks/bench_train.py --quick --no-profile > "$OUT/train-$v-$round/log" 2>&1
    echo "== train multicast=$v round $round rc=$?"
    grep -aE "^\| [0-9]|wgrad" "$OUT/train-$v-$round/log" | sort -u | cut -c1-160 | head -n 4
  done
done
mkdir -p "$OUT/record"
CLOCKS_CSV="$OUT/record/clocks.csv" OUT="$OUT/record" timeout 300 bash benchmarks/with_clocks.sh \
  python3 benchmarks/bench_layer.py > "$OUT/record/log" 2>&1
echo "== record rc=$?"
grep -aE "^\| [0-9]|geomean|clocks" "$OUT/record/log" | sort -u | cut -c1-140

#!/usr/bin/env bash
# Session 22, last call: the weight gradient's evict-first fp32 stores: GPU tests, A/B.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
RAW=${OUT:-/tmp/s22}; mkdir -p "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  tests/test_layer_train.py -k "overwrite or accumulate or uneven or deepseek" > "$RAW/tests.log" 2>&1
echo "== tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
timeout 110 python3 benchmarks/experiments/wgrad_ab.py --variant base=.variants/base \
  --variant evict_first=moe_fp8/gemm/include --rounds 3 > "$RAW/ab.log" 2>&1
echo "== A/B rc=$?"; grep -aE "^\| " "$RAW/ab.log" | cut -c1-200

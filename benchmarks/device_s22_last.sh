#!/usr/bin/env bash
# Session 22, last call: the shipped evict-first stores' GPU tests, the store probe, bench_wgrad.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
RAW=${OUT:-/tmp/s22}; mkdir -p "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  -k "overwrite or uneven or deepseek or accumulate" > "$RAW/tests.log" 2>&1
echo "== tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
timeout 50 python3 benchmarks/experiments/wgrad_store_probe.py --rounds 3 > "$RAW/store.log" 2>&1
echo "== store rc=$?"; grep -aE "^\| " "$RAW/store.log" | cut -c1-160
timeout 60 python3 benchmarks/bench_wgrad.py --repeats 10 > "$RAW/wgrad.log" 2>&1
echo "== wgrad rc=$?"; grep -aE "^\| " "$RAW/wgrad.log" | cut -c1-190

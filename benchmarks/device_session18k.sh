#!/usr/bin/env bash
# Session 18, call 11 (~4 min): the weight-gradient GEMM at 128 x 192 by default
# (heuristics.wgrad_config): its GPU tests and the autograd ones, then bench_wgrad.py and
# bench_train.py --quick (the training step's wgrad share and forward + backward vs bf16).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18k; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  tests/test_autograd.py tests/test_train_quant_gpu.py > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED" "$RAW/tests.log" | head -n 8 | cut -c1-250
OUT="$RAW" timeout 200 python3 benchmarks/bench_wgrad.py > "$RAW/wgrad.log" 2>&1
echo "bench_wgrad rc=$?"
grep -aE "^\| " "$RAW"/wgrad_2026*.md | awk -F'|' '{print $2,"|",$7,$8,$9,$10,$11}' | cut -c1-150
OUT="$RAW" timeout 240 python3 benchmarks/bench_train.py --quick > "$RAW/train.log" 2>&1
echo "bench_train rc=$?"; grep -aE "^\{|^\| " "$RAW/train.log" | head -n 12 | cut -c1-220
tar czf "$FINAL/s18k.tgz" -C "$RAW" . 2>/dev/null

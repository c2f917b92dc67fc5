#!/usr/bin/env bash
# Session 22, call 3: bf16 weight gradients on 128 x 256 tiles as the default: GPU tests, 5
# interleaved rounds against 128 x 192 at 4 stages, bench_wgrad and bench_train.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
RAW=${OUT:-/tmp/s22}; mkdir -p "$RAW"
gpu=$(nvidia-smi --query-gpu=name,power.limit --format=csv,noheader); echo "$gpu"
case "$gpu" in *H200*)  # issue 5's H200 decode record first (not re-measured since session 16)
  MOE_FP8_BENCH_FLUSH=clean timeout 200 python3 benchmarks/bench_layer.py --decode-only \
    --no-peers --repeats 20 > "$RAW/decode.log" 2>&1
  echo "== decode rc=$?"; grep -aE "^\| " "$RAW/decode.log" | cut -c1-200 | tail -n 14 ;;
esac
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  tests/test_layer_train.py -k "bf16 or wgrad" > "$RAW/tests.log" 2>&1
echo "== tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
timeout 150 python3 benchmarks/experiments/wgrad_width_probe.py --bf16 --uneven --rounds 4 \
  --configs 128x192s4c2d1 > "$RAW/width.log" 2>&1
echo "== width rc=$?"; grep -aE "^\| (record|GEMM1|32)" "$RAW/width.log" | cut -c1-200
timeout 120 python3 benchmarks/experiments/wgrad_ab.py --variant base=moe_fp8/gemm/include \
  --variant evict_first=.variants/evict_first --rounds 3 > "$RAW/ab.log" 2>&1
echo "== evict_first A/B rc=$?"; grep -aE "^\| " "$RAW/ab.log" | cut -c1-200
timeout 120 python3 benchmarks/bench_wgrad.py > "$RAW/wgrad.log" 2>&1
echo "== wgrad rc=$?"; grep -aE "^\| " "$RAW/wgrad.log" | cut -c1-220
case "$gpu" in *H200*) exit 0 ;; esac
timeout 220 python3 benchmarks/bench_train.py --repeats 5 --no-profile > "$RAW/train.log" 2>&1
echo "== train rc=$?"; grep -aE "^\| " "$RAW/train.log" | cut -c1-220

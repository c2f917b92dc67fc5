#!/usr/bin/env bash
# Session 17, call 12 (~3 min, an H100): the gather on at every decode size.
#   1. GPU tests of the layer, permute and route-dispatch files whole;
#   2. the decode record at the defaults (clean flush).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s17i; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layer_gpu.py \
  tests/test_permute_gpu.py tests/test_route_dispatch.py > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
MOE_FP8_BENCH_FLUSH=clean OUT="$RAW" timeout 200 python3 benchmarks/bench_layer.py --decode-only \
  --no-peers --repeats 20 > "$RAW/decode.log" 2>&1
echo "decode rc=$?"; grep -aE "^\{" "$RAW/decode.log" | cut -c1-150
tar czf "$FINAL/s17i.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 17, call 3 (~5 min, an H100): the decode runner's per-batch-size graphs.
#   1. GPU tests of the decode runner (layer and permute files: graphs, replays below size, bits);
#   2. the decode record (clean flush) with the 1 / 3 / 100-token rows on the 256-token runner.
# Everything under $OUT/s17c.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s17c; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layer_gpu.py \
  tests/test_permute_gpu.py -k "decode or graph" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
MOE_FP8_BENCH_FLUSH=clean OUT="$RAW" timeout 240 python3 benchmarks/bench_layer.py --decode-only \
  --no-peers --repeats 20 > "$RAW/decode.log" 2>&1
echo "decode rc=$?"; grep -aE "^\{" "$RAW/decode.log" | cut -c1-200
tar czf "$FINAL/s17c.tgz" -C "$RAW" . 2>/dev/null

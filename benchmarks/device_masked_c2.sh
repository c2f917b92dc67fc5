#!/usr/bin/env bash
# Session 21 (~3 min): B-multicast pairs on the masked layout.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_masked_c2.sh
#   1. GPU tests (masked B multicast, the masked targets / uneven / pinned tests beside them);
#   2. compute-sanitizer memcheck + racecheck + synccheck of the masked B-multicast test;
#   3. experiments/wide_masked_probe.py: masked 128 x 256 without and with B multicast.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/masked_c2; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  -k "masked" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
for tool in memcheck racecheck synccheck; do
  timeout 100 compute-sanitizer --tool $tool --kernel-name kns=moe_fp8 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
    -k "test_masked_b_multicast and 128x256" > "$RAW/san_$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE "ERROR SUMMARY|RACECHECK SUMMARY" "$RAW/san_$tool.log" | tail -n 1)"
done
timeout 150 python3 benchmarks/experiments/wide_masked_probe.py > "$RAW/probe.log" 2>&1
echo "probe rc=$?"; grep -aE "^\|" "$RAW/probe.log" | cut -c1-120
tar czf "$FINAL/masked_c2.tgz" -C "$RAW" . 2>/dev/null

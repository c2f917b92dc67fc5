#!/usr/bin/env bash
# Session 18, call 13 (~3 min): the weight-gradient epilogue's fp32 staging as a ring of 32-column
# buffers (one more mainloop stage: 128 x 192 at 4, 128 x 128 at 5): wgrad GPU tests, racecheck of
# the ring on 3 SMs, and experiments/wgrad_width_probe.py --ring (5 interleaved rounds).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18m; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py > "$RAW/tests.log" 2>&1
echo "wgrad tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED" "$RAW/tests.log" | head -n 8 | cut -c1-250
timeout 120 compute-sanitizer --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 20 \
  --tool racecheck python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  -k "r2p3" > "$RAW/racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -aE 'SUMMARY' "$RAW/racecheck.log" | tail -n 1)"
OUT="$RAW" timeout 200 python3 benchmarks/experiments/wgrad_width_probe.py --rounds 5 --ring \
  > "$RAW/probe.log" 2>&1
echo "probe rc=$?"; grep -a "^{" "$RAW/probe.log" | cut -c1-200
tar czf "$FINAL/s18m.tgz" -C "$RAW" . 2>/dev/null

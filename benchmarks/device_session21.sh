#!/usr/bin/env bash
# Session 21's last call (~6 min), two experiments in one start:
#   1. the fp32 / bf16-slice epilogues in 32-column steps (device_epilogue_steps.sh, trimmed):
#      GPU tests, racecheck, wgrad_ab against .variants/old;
#   2. masked B-multicast pairs: GPU tests, memcheck, wide_masked_probe.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session21.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=$FINAL/s21; mkdir -p "$RAW"  # logs come back even on a timeout
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  tests/test_gemm_gpu.py -k "wgrad_overwrites or wgrad_bf16_out or wgrad_uneven or split or masked_b_multicast" \
  > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
timeout 70 compute-sanitizer --tool racecheck --kernel-name kns=moe_fp8 --print-limit 20 \
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py::test_wgrad_overwrites \
  tests/test_wgrad_gpu.py::test_wgrad_bf16_out > "$RAW/san_racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -aE "RACECHECK SUMMARY" "$RAW/san_racecheck.log" | tail -n 1)"
timeout 120 python3 benchmarks/experiments/wgrad_ab.py --variant old=.variants/old \
  --variant new=moe_fp8/gemm/include --rounds 3 > "$RAW/wgrad_ab.log" 2>&1
echo "wgrad_ab rc=$?"; grep -aE "^\| [r3]" "$RAW/wgrad_ab.log" | cut -c1-120
timeout 50 compute-sanitizer --tool memcheck --kernel-name kns=moe_fp8 --print-limit 20 \
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py::test_masked_b_multicast \
  > "$RAW/san_memcheck.log" 2>&1
echo "memcheck rc=$? $(grep -aE "ERROR SUMMARY" "$RAW/san_memcheck.log" | tail -n 1)"
timeout 80 python3 benchmarks/experiments/wide_masked_probe.py > "$RAW/probe.log" 2>&1
echo "masked probe rc=$?"; grep -aE "^\| [0-9]" "$RAW/probe.log" | cut -c1-110

#!/usr/bin/env bash
# Session 21 (~5 min): the fp32 / bf16-slice epilogues in 32-column steps (one bulk group each,
# so a tile's staging overlaps the previous tile's drain): tests, sanitizer, A/B against the tree
# before (wgrad_ab; gemm_ab on the split-K shapes, whose fp32 epilogue is the same).
#   bash benchmarks/make_variants.sh is NOT used: .variants/old holds the include tree before the
#   change (git archive 16f810b moe_fp8/gemm/include), copied with the working tree.
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_epilogue_steps.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/epilogue_steps; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  tests/test_gemm_gpu.py tests/test_autograd.py -k "wgrad or split or bf16_masters" \
  > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
for tool in memcheck racecheck synccheck; do
  timeout 100 compute-sanitizer --tool $tool --kernel-name kns=moe_fp8 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py::test_wgrad_overwrites \
    tests/test_wgrad_gpu.py::test_wgrad_bf16_out > "$RAW/san_$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE "ERROR SUMMARY|RACECHECK SUMMARY" "$RAW/san_$tool.log" | tail -n 1)"
done
timeout 200 python3 benchmarks/experiments/wgrad_ab.py --variant old=.variants/old \
  --variant new=moe_fp8/gemm/include > "$RAW/wgrad_ab.log" 2>&1
echo "wgrad_ab rc=$?"; grep -aE "^\| [r3]" "$RAW/wgrad_ab.log" | cut -c1-120
timeout 60 python3 benchmarks/gemm_ab.py --variant old=.variants/old \
  --variant new=moe_fp8/gemm/include --rounds 5 --shape 64,2112,7168 --shape 128,2112,7168 \
  > "$RAW/gemm_ab_split.log" 2>&1
echo "gemm_ab (split K) rc=$?"; grep -aE "^\| [0-9]" "$RAW/gemm_ab_split.log" | cut -c1-120
tar czf "$FINAL/epilogue_steps.tgz" -C "$RAW" . 2>/dev/null

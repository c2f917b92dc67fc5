#!/usr/bin/env bash
# Session 18, call 2 (~5 min): masked split K with claimed units (include/masked_split.cuh,
# MOE_FP8_MASKED_SPLIT_K, off by default).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session18b.sh
#   1. GPU tests: the split GEMM / gather SwiGLU tests, the layer's split decode test;
#   2. compute-sanitizer memcheck and racecheck of a few-SM split test;
#   3. decode_build_ab.py: MOE_FP8_MASKED_SPLIT_K=4 (A) vs off (B), 1 / 2 / 8 / 32 / 128 tokens;
#      then S = 8 (A) vs off at 1 / 8 tokens.
# Everything under $OUT/s18b.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s18b; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  -k "split_k or masked_graph or masked_all_empty or gather" > "$RAW/tests.log" 2>&1
echo "gemm tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 8 | cut -c1-250
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layer_gpu.py \
  -k "masked_split_k or gather_keeps_bits" > "$RAW/layer_tests.log" 2>&1
echo "layer tests rc=$? $(tail -n 1 "$RAW/layer_tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/layer_tests.log" | head -n 8 | cut -c1-250
SAN="compute-sanitizer --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 50"
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=$([ $tool = memcheck ] && echo 1 || echo 0) timeout 150 \
    $SAN --tool $tool python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
    -k "test_masked_split_k and (s2_early_sm5 or n48_s8_sm3)" > "$RAW/$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE 'SUMMARY' "$RAW/$tool.log" | tail -n 1) $(tail -n 1 "$RAW/$tool.log" | cut -c1-80)"
done
OUT="$RAW" timeout 220 python3 benchmarks/decode_build_ab.py --tokens 1,2,8,32,128 \
  --a-env MOE_FP8_MASKED_SPLIT_K=4 --max-diff 1e-4 > "$RAW/split4_ab.log" 2>&1
echo "split 4 (A) vs off (B) rc=$?"; grep -a "^{" "$RAW/split4_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/split4_ab.md" 2>/dev/null
OUT="$RAW" timeout 120 python3 benchmarks/decode_build_ab.py --tokens 1,8 \
  --a-env MOE_FP8_MASKED_SPLIT_K=8 --max-diff 1e-4 > "$RAW/split8_ab.log" 2>&1
echo "split 8 (A) vs off (B) rc=$?"; grep -a "^{" "$RAW/split8_ab.log" | cut -c1-300
mv "$RAW"/decode_build_ab_*.md "$RAW/split8_ab.md" 2>/dev/null
tar czf "$FINAL/s18b.tgz" -C "$RAW" . 2>/dev/null

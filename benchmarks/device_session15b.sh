#!/usr/bin/env bash
# Session 15, second GPU call: B multicast on the contiguous layouts (MOE_FP8_CONTIGUOUS_MULTICAST).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session15b.sh
#   1. GPU tests with the switch on: the GEMM's contiguous and multicast tests, the layer and
#      the layer's training step (the zero-padding GEMMs);
#   2. power_probe: contiguous record shapes, ours without / with B multicast, cuBLAS;
#   3. layer prefill, switch 0 / 1, two interleaved rounds;
#   4. compute-sanitizer memcheck and racecheck of the pairs test (128 x 128 on 4 SMs).
# Logs under $OUT; a short table last.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUT=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$OUT/precompile.log" 2>&1 || echo "precompile failed"
PYTEST="python3 -m pytest -q -p no:cacheprovider -m gpu"
MOE_FP8_CONTIGUOUS_MULTICAST=1 timeout 240 $PYTEST tests/test_gemm_gpu.py \
  -k "multicast or contiguous" > "$OUT/tests_gemm.log" 2>&1
echo "== gemm tests rc=$? $(tail -n 1 "$OUT/tests_gemm.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$OUT/tests_gemm.log" | head -n 6 | cut -c1-250
MOE_FP8_CONTIGUOUS_MULTICAST=1 timeout 200 $PYTEST tests/test_layer_gpu.py tests/test_layer_train.py \
  > "$OUT/tests_layer.log" 2>&1
echo "== layer tests rc=$? $(tail -n 1 "$OUT/tests_layer.log" | cut -c1-120)"
grep -aE "^FAILED" "$OUT/tests_layer.log" | head -n 6 | cut -c1-250
OUT="$OUT" timeout 100 python3 benchmarks/power_probe.py --seconds 2 --cases contiguous \
  --configs 128x256c2d1 > "$OUT/power_probe.log" 2>&1
echo "== power_probe rc=$?"
grep -a "^{" "$OUT/power_probe.log" | python3 -c "
import ast, sys
for l in sys.stdin:
    r = ast.literal_eval(l)
    print(f\"{r['case']:32s} {r['kernel']:20s} r{r['round']} {r['TFLOPS']:7.1f} TFLOPS {r['sm_MHz']:6.0f} MHz {r['W']:4.0f} W {r['TFLOPS_per_100W']:6.1f}/100W\")"
for round in 1 2; do
  for v in 0 1; do
    mkdir -p "$OUT/prefill-$v-$round"
    OUT="$OUT/prefill-$v-$round" MOE_FP8_CONTIGUOUS_MULTICAST=$v timeout 150 python3 \
      benchmarks/bench_layer.py --prefill-only --no-peers --repeats 5 > "$OUT/prefill-$v-$round/log" 2>&1
    echo "== prefill multicast=$v round $round rc=$?"
    grep -aE "^\| [0-9]" "$OUT/prefill-$v-$round/log" | cut -c1-110
  done
done
SAN="compute-sanitizer --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 20"
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 $SAN --tool $tool $PYTEST tests/test_gemm_gpu.py \
    -k "b_multicast_pairs and 128x128p4" > "$OUT/sanitize_$tool.log" 2>&1
  echo "== $tool rc=$? $(grep -aE 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$OUT/sanitize_$tool.log" | tr '\n' ' ' | cut -c1-200)"
done

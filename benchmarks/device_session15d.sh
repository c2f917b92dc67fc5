#!/usr/bin/env bash
# Session 15, fourth GPU call: the contiguous fused SwiGLU GEMM with B multicast
# (MOE_FP8_PREFILL_SWIGLU; the gate and up boxes shared by a pair of row blocks).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_session15d.sh
#   1. GPU tests: the SwiGLU / multicast GEMM tests, the layer's prefill-SwiGLU bits test;
#   2. compute-sanitizer memcheck + racecheck of the contiguous SwiGLU test on 4 SMs;
#   3. prefill_swiglu_pair.py (the gate-up step alone, GEMM + SiLU vs fused);
#   4. layer prefill with MOE_FP8_PREFILL_SWIGLU 0 / 1, four interleaved rounds.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUT=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$OUT/precompile.log" 2>&1 || echo "precompile failed"
PYTEST="python3 -m pytest -q -p no:cacheprovider -m gpu"
timeout 150 $PYTEST tests/test_gemm_gpu.py -k "swiglu or multicast" > "$OUT/tests_gemm.log" 2>&1
echo "== gemm tests rc=$? $(tail -n 1 "$OUT/tests_gemm.log" | cut -c1-120)"
timeout 120 $PYTEST tests/test_layer_gpu.py -k "prefill_swiglu" > "$OUT/tests_layer.log" 2>&1
echo "== layer tests rc=$? $(tail -n 1 "$OUT/tests_layer.log" | cut -c1-120)"
grep -aE "^FAILED" "$OUT"/tests_*.log | head -n 6 | cut -c1-250
SAN="compute-sanitizer --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 20"
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 $SAN --tool $tool $PYTEST tests/test_gemm_gpu.py \
    -k "contiguous_swiglu and c2p4 and False" > "$OUT/sanitize_$tool.log" 2>&1
  echo "== $tool rc=$? $(grep -aE 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$OUT/sanitize_$tool.log" | tr '\n' ' ' | cut -c1-200)"
done
OUT="$OUT" timeout 120 python3 benchmarks/prefill_swiglu_pair.py --rounds 3 > "$OUT/pair.log" 2>&1
echo "== pair rc=$?"; grep -aE "^\|" "$OUT/pair.log" | cut -c1-200 | tail -n 12
for round in 1 2 3 4; do
  for v in 0 1; do
    mkdir -p "$OUT/prefill-$v-$round"
    OUT="$OUT/prefill-$v-$round" MOE_FP8_PREFILL_SWIGLU=$v timeout 100 python3 \
      benchmarks/bench_layer.py --prefill-only --no-peers --repeats 5 > "$OUT/prefill-$v-$round/log" 2>&1
    echo "== prefill swiglu=$v round $round rc=$? $(grep -aE '^\| [0-9]' "$OUT/prefill-$v-$round/log" | sort -u | awk -F'|' '{printf "%s:%s ", $2, $4}')"
  done
done
tar -czf "$OUT/prefill_logs.tgz" -C "$OUT" $(cd "$OUT" && ls -d prefill-*) && rm -rf "$OUT"/prefill-*

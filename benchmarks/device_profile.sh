#!/usr/bin/env bash
# One device call: ncu profiles of the large-M mainloop (double-buffered and single-buffered
# 128 x 128) and the large-M tile sweep of bench_gemm; with GROUPED_CONFIGS, pinned configs on the
# contiguous grouped rows (bench_grouped); with AB_VARIANTS (+ AB_CONFIGS, AB_SHAPES), the GEMM A/B
# of kernel versions first; TESTS (pytest -k of test_gemm_gpu.py, TESTS_ENV="VAR=value ..."); LAYER_SWITCH (bench_layer with
# that environment switch 0, then 1); DECODE (profile_layer's decode graph at that many tokens;
# RUNNER: the runner's capacity when larger).
# NCU_SPECS=" " skips ncu, BENCH=0 the sweep. From HEAD:
#   cd .snap && MOE_FP8_COMMIT=<sha> bash benchmarks/device_profile.sh
# Everything lands in $OUT/profile.tgz plus a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL="${OUT:-/tmp/moe_fp8_out}"; RAW=/tmp/profile_raw; mkdir -p "$RAW" "$FINAL"
if [ -n "${AB_VARIANTS:-}" ]; then  # kernel versions under .variants (make_variants.sh), A/B first
  OUT="$RAW" bash benchmarks/device_gemm_explore.sh "$AB_VARIANTS" "${AB_CONFIGS:-128x128c1d1}" \
    "${AB_SHAPES:-4096,4096,7168 4096,7168,2048}" | cut -c1-150
fi
i=0
while read -r m n k bm bn c d; do
  [ -z "$m" ] && continue
  OUT="$RAW" timeout 150 bash benchmarks/ncu_gemm.sh "$m" "$n" "$k" "$bm" "$bn" "$c" "$d" \
    > "$RAW/ncu_$i.summary" 2>&1
  echo "== ncu $m $n $k ${bm}x${bn}c${c}d${d}"; cat "$RAW/ncu_$i.summary"; i=$((i + 1))
done <<< "${NCU_SPECS:-4096 4096 7168 128 128 1 1
4096 4096 7168 128 128 1 0
4096 7168 2048 128 128 1 1}"
if [ -n "${BENCH:-1}" ] && [ "${BENCH:-1}" != 0 ]; then
  timeout "${BENCH_S:-200}" python3 benchmarks/bench_gemm.py --repeats 10 --only-m 4096 --sweep \
    --sweep-m 4096 > "$RAW/bench-gemm.log" 2>&1
  grep -aE "^\|" "$RAW/bench-gemm.log" | cut -c1-150 | tail -n 40
fi
if [ -n "${GROUPED_CONFIGS:-}" ]; then  # pinned configs beside the heuristic on the contiguous rows
  timeout "${GROUPED_S:-150}" python3 benchmarks/bench_grouped.py --only contiguous --repeats 10 \
    --contiguous-configs "$GROUPED_CONFIGS" > "$RAW/bench-grouped.log" 2>&1
  grep -aE "^\|" "$RAW/bench-grouped.log" | cut -c1-220 | tail -n 12
fi
if [ -n "${TESTS:-}" ]; then  # GPU tests of the GEMM family, pytest -k expression
  env ${TESTS_ENV:-} timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
    -k "$TESTS" > "$RAW/tests.log" 2>&1
  echo "tests: $(tail -n 1 "$RAW/tests.log")"; grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10
fi
if [ -n "${LAYER_SWITCH:-}" ]; then  # bench_layer with an environment switch off, then on
  for v in 0 1; do
    env "$LAYER_SWITCH=$v" timeout 80 python3 benchmarks/bench_layer.py --quick --repeats 5 \
      > "$RAW/bench-layer-$v.log" 2>&1
    echo "== bench_layer $LAYER_SWITCH=$v"; grep -aE "^\|" "$RAW/bench-layer-$v.log" | tail -n 12 | cut -c1-150
  done
fi
if [ -n "${DECODE:-}" ]; then  # the layer's decode graph at DECODE tokens, kernel by kernel
  timeout 150 python3 benchmarks/profile_layer.py --tokens --decode "$DECODE" --mode fused \
    --runner "${RUNNER:-0}" \
    --top 24 > "$RAW/profile-decode.log" 2>&1
  grep -aE "^decode|^\|" "$RAW/profile-decode.log" | grep -v "^|--" | cut -c1-150 | head -n 75
fi
cp benchmarks/results/*_"$(date +%F)"* "$RAW/" 2>/dev/null
tar -czf "$FINAL/profile.tgz" -C "$RAW" .

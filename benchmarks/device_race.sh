#!/usr/bin/env bash
# One device call: compute-sanitizer racecheck of the GEMM GPU tests named by RACE_K (pytest -k,
# one test per sanitizer run so each finding names its test; kernels built with -lineinfo), then
# optionally ncu (NCU_SPECS, as device_profile.sh), the contiguous grouped table (GROUPED=1) and
# the decode profile of the layer at DECODE tokens, and (QUANT=1) the quant GPU tests and
# bench_quant --decode. Logs: $OUT/race.tgz.
#   cd .snap && MOE_FP8_COMMIT=<sha> RACE_K="..." bash benchmarks/device_race.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL="${OUT:-/tmp/moe_fp8_out}"; RAW=/tmp/race_raw; mkdir -p "$RAW" "$FINAL"
pack() { tar -czf "$FINAL/race.tgz" -C "$RAW" .; }
if [ -n "${RACE_K:-}" ]; then
  ids=$(python3 -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/test_gemm_gpu.py \
        -k "$RACE_K" 2>/dev/null | grep "::")
  i=0
  while IFS= read -r id; do  # ids hold spaces (GemmConfig reprs): one per line
    [ -z "$id" ] && continue
    [ $SECONDS -gt "${RACE_S:-240}" ] && { echo "racecheck: time up before $id"; break; }
    MOE_FP8_JIT_LINEINFO=1 MOE_FP8_CACHE_DIR=/tmp/moe_fp8_cache_lineinfo timeout 90 \
      compute-sanitizer --tool racecheck --kernel-name kns=moe_fp8 --print-limit 10 \
      python3 -m pytest -q -p no:cacheprovider -m gpu "$id" > "$RAW/race_$i.log" 2>&1
    echo "$id: $(grep -aE 'RACECHECK SUMMARY|passed|failed' "$RAW/race_$i.log" | tr '\n' ' ' | cut -c1-120)"
    grep -aE "Race reported|Error:" "$RAW/race_$i.log" | head -n 2 | cut -c1-300
    grep -aE "^=========     at |in .*\.cuh:[0-9]+" "$RAW/race_$i.log" | head -n 4 | cut -c1-200
    i=$((i + 1)); pack
  done <<< "$ids"
fi
i=0
while read -r m n k bm bn c d; do
  [ -z "$m" ] && continue
  OUT="$RAW" timeout 150 bash benchmarks/ncu_gemm.sh "$m" "$n" "$k" "$bm" "$bn" "$c" "$d" \
    > "$RAW/ncu_$i.summary" 2>&1
  echo "== ncu $m $n $k ${bm}x${bn}c${c}d${d}"; cat "$RAW/ncu_$i.summary"; i=$((i + 1)); pack
done <<< "${NCU_SPECS:-}"
if [ "${GROUPED:-0}" = 1 ]; then
  OUT="$RAW" timeout 150 python3 benchmarks/bench_grouped.py --only contiguous --repeats 10 \
    ${GROUPED_CONFIGS:+--contiguous-configs "$GROUPED_CONFIGS"} > "$RAW/bench-grouped.log" 2>&1
  grep -aE "^\|" "$RAW/bench-grouped.log" | grep -v "^|--" | cut -c1-200 | tail -n 10; pack
fi
if [ "${QUANT:-0}" = 1 ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant_gpu.py \
    > "$RAW/tests-quant.log" 2>&1
  echo "quant tests: $(tail -n 1 "$RAW/tests-quant.log")"; grep -aE "^FAILED" "$RAW/tests-quant.log" | head -n 5
  OUT="$RAW" timeout 90 python3 benchmarks/bench_quant.py --decode --repeats 20 \
    > "$RAW/bench-quant.log" 2>&1
  grep -aE "^\|" "$RAW/bench-quant.log" | grep -v "^|--" | cut -c1-220 | tail -n 14; pack
fi
if [ -n "${DECODE:-}" ]; then
  OUT="$RAW" timeout 150 python3 benchmarks/profile_layer.py --tokens --decode "$DECODE" \
    --mode fused --top 24 > "$RAW/profile-decode.log" 2>&1
  grep -aE "^decode|^\|" "$RAW/profile-decode.log" | grep -v "^|--" | cut -c1-150 | head -n 45; pack
fi
pack

#!/usr/bin/env bash
# The record tables in one device call, each step under a time limit, its table printed as it
# ends and every log / result file in $OUT/record.tgz (a call returns few files).
#   cd .snap && MOE_FP8_COMMIT=<sha> STEPS="probe layer:write layer:clean" bash benchmarks/device_record.sh
# STEPS (default "layer:write"): probe (flush_probe.py), layer:<flush> (bench_layer, full list),
# decode:<flush> (bench_layer --decode-only --no-peers), gemm:<flush> (bench_gemm),
# grouped:<flush> (bench_grouped; MASKED_CONFIGS pinned beside the decode rows), masked:<flush>
# / contiguous:<flush> (one of its tables), wgrad:<flush> (bench_wgrad), where <flush> is the L2
# flush mode of benchmarks/common.py (write | clean).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL="${OUT:-/tmp/moe_fp8_out}"; RAW=${RAW:-/tmp/record_raw}; mkdir -p "$RAW" "$FINAL"
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
run() {  # run NAME FLUSH TIMEOUT_S CMD...
  local name=$1 flush=$2 limit=$3; shift 3; local t0=$SECONDS
  mkdir -p "$RAW/$name"
  OUT="$RAW/$name" MOE_FP8_BENCH_FLUSH="$flush" timeout --kill-after=5 "$limit" "$@" \
    > "$RAW/$name/log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s"
  grep -aE "^\|" "$RAW/$name/log" | grep -v "^|--" | cut -c1-${WIDTH:-190} | tail -n "${ROWS:-24}"
  tar -czf "$FINAL/record.tgz" -C "$RAW" .
}
for step in ${STEPS:-layer:write}; do
  what=${step%%:*}; flush=${step#*:}; [ "$flush" = "$step" ] && flush=write
  case "$what" in
    probe) run probe write 240 python3 benchmarks/flush_probe.py --repeats 20 ;;
    layer) run "layer-$flush" "$flush" 300 python3 benchmarks/bench_layer.py ;;
    decode) run "decode-$flush" "$flush" 160 python3 benchmarks/bench_layer.py --decode-only --no-peers --repeats 20 ;;
    gemm) run "gemm-$flush" "$flush" 200 python3 benchmarks/bench_gemm.py ;;
    grouped) run "grouped-$flush" "$flush" 240 python3 benchmarks/bench_grouped.py \
               ${MASKED_CONFIGS:+--masked-configs "$MASKED_CONFIGS"} ;;
    masked) run "masked-$flush" "$flush" 200 python3 benchmarks/bench_grouped.py --only masked \
               ${MASKED_CONFIGS:+--masked-configs "$MASKED_CONFIGS"} ;;
    contiguous) run "contiguous-$flush" "$flush" 200 python3 benchmarks/bench_grouped.py \
               --only contiguous ;;
    wgrad) run "wgrad-$flush" "$flush" 200 python3 benchmarks/bench_wgrad.py ;;
    *) echo "unknown step $step" ;;
  esac
done

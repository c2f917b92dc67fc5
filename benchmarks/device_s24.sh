#!/usr/bin/env bash
# Session 24's first device call (one-off): the deep-ring SwiGLU, the masked spread and swap-AB
# down A/Bs on the decode step, a masked down-GEMM tile probe, the prefill SwiGLU pair, bench_wgrad.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/mc}
L="${OUT:-/tmp/out}/l"; mkdir -p "$L"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
step() {  # step NAME LIMIT CMD...: log to $L/NAME.log, print its table rows
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$L/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s"
  grep -aE "^\\||^\{|passed|failed|rror" "$L/$name.log" | grep -v "^|--" | cut -c1-200 | tail -n "${ROWS:-14}"
}
for s in ${STEPS:-pre tests deep spread swapab probe prefill wgrad}; do
  case $s in
    pre) step pre 200 python3 -m moe_fp8.gemm.precompile ;;
    tests) step tests 200 python3 -m pytest -q -m gpu tests/test_gemm_gpu.py tests/test_layer_gpu.py \
             -k "swiglu or gather or batch_size" ;;
    deep) step deep 200 python3 benchmarks/decode_build_ab.py --tokens 1,8,128,256 \
            --b-env MOE_FP8_SWIGLU_DEEP_RING=1 ;;
    spread) step spread 150 python3 benchmarks/decode_build_ab.py --tokens 128,256 \
              --b-env MOE_FP8_MASKED_SPREAD=0 ;;
    spreaddeep) step spreaddeep 150 python3 benchmarks/decode_build_ab.py --tokens 128,256 \
              --a-env MOE_FP8_SWIGLU_DEEP_RING=1 --b-env MOE_FP8_MASKED_SPREAD=0,MOE_FP8_SWIGLU_DEEP_RING=1 ;;
    swapab) step swapab 120 python3 benchmarks/decode_build_ab.py --tokens 256 \
              --b-env MOE_FP8_SWAP_AB_DOWN=1 ;;
    probe) step probe 150 python3 benchmarks/experiments/layout_rounds.py \
             --configs auto,64x128s8c1d1r16,128x128s5c1d1r32,128x256s3c1d0r32 \
             --case masked:32x64,7168,2048 --case masked:32x80,7168,2048 --rounds 3 ;;
    prefill) step prefill 150 python3 benchmarks/prefill_swiglu_pair.py ;;
    wgrad) step wgrad 200 python3 benchmarks/bench_wgrad.py ;;
  esac
  tar -czf "${OUT:-/tmp/out}/logs.tgz" -C "$L" .
done

#!/usr/bin/env bash
# One device call (~2 min on an H100, session 33) for the graph runner's layouts: buckets past
# kRunnerMaskedMaxRows expected rows per expert capture the contiguous layout (MOE_FP8_RUNNER_MASKED).
#   MOE_FP8_COMMIT=<sha> [STEPS="tests sizes attached rows ceiling"] bash benchmarks/device_runner_layouts.sh
# Steps, in order, each under a time cap inside one budget (DEVICE_BUDGET_S, default 560 s):
#   tests     the layer's GPU tests (the contiguous buckets' replay test, session 32's
#             gather-by-rows test)
#   sizes     device_runner_sizes.sh at 256 / 384 / 512 / 1024 / 2048 tokens: the default runner
#             (A) against the masked runner (MOE_FP8_RUNNER_MASKED=1) with session 32's decode
#             switch limits, then with both decode switches forced on (the runner before session
#             32); the eager layer in the same rounds; first a profile of the 1024-token replay
#   attached  experiments/attached_runner.py, two layers, runners of 2048 tokens attached
#   rows      experiments/contiguous_rows_ab.py: the eager layout sized exactly (one sync) or by
#             its upper bound, 256-4096 tokens
#   ceiling   (an H200 only) device_read_ceiling.sh without ncu: is the decode floor reachable
# The tables are printed as each step ends; logs in $OUT.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUTDIR=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUTDIR"
STEPS=" ${STEPS:-tests sizes attached rows ceiling} "
budget=${DEVICE_BUDGET_S:-560}
want() { [[ "$STEPS" == *" $1 "* ]]; }
left() { echo $((budget - SECONDS)); }
cap() {  # cap LIMIT: LIMIT, or what is left of the budget if less
  local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"
}
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout "$(cap 150)" python3 -m moe_fp8.gemm.precompile > "$OUTDIR/precompile.log" 2>&1
echo "precompile rc=$? t=${SECONDS}s"
if want tests; then
  timeout "$(cap 150)" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layer_gpu.py \
    > "$OUTDIR/test_layer_gpu.log" 2>&1
  echo "tests rc=$? t=${SECONDS}s: $(tail -n 1 "$OUTDIR/test_layer_gpu.log")"
  grep -aE "^(FAILED|ERROR)" "$OUTDIR/test_layer_gpu.log" | cut -c1-200
fi
if want sizes; then
  OUT="$OUTDIR" TOKENS=${TOKENS:-256,384,512,1024,2048} PROFILE_TOKENS=1024 \
    timeout "$(cap 260)" bash benchmarks/device_runner_sizes.sh
  echo "sizes t=${SECONDS}s"
fi
if want attached; then
  timeout "$(cap 120)" python3 benchmarks/experiments/attached_runner.py --tokens 1,256,512,1024,2048 \
    --max-tokens 2048 > "$OUTDIR/attached.log" 2>&1
  echo "attached rc=$? t=${SECONDS}s"; cut -c1-200 "$OUTDIR/attached.log"
fi
if want rows; then
  timeout "$(cap 120)" python3 benchmarks/experiments/contiguous_rows_ab.py > "$OUTDIR/rows_ab.log" 2>&1
  echo "rows rc=$? t=${SECONDS}s"; cut -c1-300 "$OUTDIR/rows_ab.log"
fi
if want ceiling && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  OUT="$OUTDIR/ceiling" timeout "$(cap 170)" bash benchmarks/device_read_ceiling.sh
fi
echo "done t=${SECONDS}s"

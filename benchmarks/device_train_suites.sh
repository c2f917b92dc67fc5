#!/usr/bin/env bash
# One device call (~3 min on an H100) for the suites the eager layout change (05a1214: the padded
# contiguous layout at every size on a GPU) had not yet run: training, autograd, the NaN policy,
# torch.compile, the EP code as one NCCL rank, and the demo. On an H200 it then runs issue 5's
# read ceiling (device_read_ceiling.sh without ncu).
#   MOE_FP8_COMMIT=<sha> [STEPS="tests ep demo train ceiling"] bash benchmarks/device_train_suites.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUTDIR=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUTDIR"
STEPS=" ${STEPS:-tests ep demo train ceiling} "
budget=${DEVICE_BUDGET_S:-560}
want() { [[ "$STEPS" == *" $1 "* ]]; }
cap() { local l=$((budget - SECONDS)); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
step() {  # step NAME LIMIT CMD...: log to $OUTDIR/NAME.log, one status line, failures listed
  local name=$1 limit; limit=$(cap "$2"); shift 2; local t0=$SECONDS
  if [ "$limit" -lt 15 ]; then echo "$name skipped (budget)"; return; fi
  timeout --kill-after=5 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s: $(grep -aE 'passed|failed|error' "$OUTDIR/$name.log" | tail -n 1 | cut -c1-120)"
  grep -aE "^(FAILED|ERROR)" "$OUTDIR/$name.log" | cut -c1-220 | head -n 12
}
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
step precompile 150 python3 -m moe_fp8.gemm.precompile
PYTEST="python3 -m pytest -q -p no:cacheprovider"
want tests && step tests 240 $PYTEST -m gpu tests/test_layer_train.py tests/test_autograd.py \
  tests/test_nan_policy.py tests/test_layer_compile.py
want ep && step ep-1rank 90 env MOE_FP8_EP_GPU_WORLD=1 $PYTEST tests/test_ep_gpu.py
want demo && step demo 90 python3 examples/deepseek_v3_moe.py
want demo && grep -aE "^\|" "$OUTDIR/demo.log" | cut -c1-160 | tail -n 12
if want train; then
  step bench-train 100 python3 benchmarks/bench_train.py --quick --repeats 3 --no-profile
  grep -aE "^\|" "$OUTDIR/bench-train.log" | grep -v "^|--" | cut -c1-170 | tail -n 12
fi
if want ceiling && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  OUT="$OUTDIR/ceiling" timeout "$(cap 200)" bash benchmarks/device_read_ceiling.sh
fi
echo "done t=${SECONDS}s"

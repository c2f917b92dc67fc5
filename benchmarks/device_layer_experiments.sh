#!/usr/bin/env bash
# One device call (~5 min on an H100) for session 34's layer changes:
#   tests       test_shared_fold.py, test_permute_gpu.py (the unread padding blocks),
#               test_router_gpu.py (the fold's ids kernel)
#   foldeager   experiments/eager_switch_ab.py: the eager layer, the side path (default, A) against
#               the shared expert folded into the routed GEMMs (MOE_FP8_FOLD_SHARED=1, B)
#   foldrunner  device_runner_sizes.sh: the graph runner, the same A/B at 768 / 1024 / 2048 tokens,
#               the eager layer in the same rounds (PROFILE=1: first a profile of the 1024-token replay)
#   buckets     experiments/runner_buckets_ab.py: a runner of 2048 with and without the 1.5x
#               buckets 768 / 1536, replayed at 640-1700 tokens
#   layertests  test_layer_gpu.py with MOE_FP8_FOLD_SHARED=1
#   ep1         test_ep_gpu.py as one NCCL rank (MOE_FP8_EP_GPU_WORLD=1)
#   MOE_FP8_COMMIT=<sha> [STEPS="tests foldeager foldrunner buckets layertests ep1"] [PROFILE=1] \
#     bash benchmarks/device_layer_experiments.sh
# (default: all but buckets and ep1)
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUTDIR=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUTDIR"
STEPS=${STEPS:-tests foldeager foldrunner layertests}
source benchmarks/device_steps.sh  # want, cap, step
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
step precompile 150 python3 -m moe_fp8.gemm.precompile
# the new kernels' and the fold's own GPU tests first; the layer's suite with the fold on last
want tests && step tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_shared_fold.py \
  tests/test_permute_gpu.py tests/test_router_gpu.py
want foldeager && step foldeager 150 python3 benchmarks/experiments/eager_switch_ab.py \
  --env MOE_FP8_FOLD_SHARED=1 --tokens 1024,2048,4096,8192,16384
if want foldrunner; then
  OUT="$OUTDIR" SWITCHES=MOE_FP8_FOLD_SHARED=1 TOKENS=768,1024,2048 PROFILE=${PROFILE:-0} PROFILE_TOKENS=1024 \
    timeout "$(cap 200)" bash benchmarks/device_runner_sizes.sh
fi
want buckets && step buckets 120 python3 benchmarks/experiments/runner_buckets_ab.py
want layertests && step layertests 150 env MOE_FP8_FOLD_SHARED=1 python3 -m pytest -q \
  -p no:cacheprovider -m gpu tests/test_layer_gpu.py
want ep1 && step ep1 120 env MOE_FP8_EP_GPU_WORLD=1 python3 -m pytest -q -p no:cacheprovider \
  tests/test_ep_gpu.py
echo "done t=${SECONDS}s"

#!/usr/bin/env bash
# Dynamic tiles (include/tile_claim.cuh, MOE_FP8_DYNAMIC_TILES) on one GPU, in steps:
#   smoke    two small cases first (a hang stops the call early)
#   kernel   experiments/dynamic_tiles_ab.py: the contiguous GEMMs alone and contended, A/B
#   tests    test_dynamic_tiles_gpu.py: the static kernel's bits, counters back at zero, graphs,
#            a kernel holding the SMs on another stream; the layer's bits with the switch
#   eager    experiments/eager_switch_ab.py: the eager layer, switch unset (A) / on (B)
#   runner   device_runner_sizes.sh: the graph runner's contiguous buckets, the same A/B
#   san      memcheck / racecheck / synccheck of small dynamic cases (the claim, the mailbox)
#   layer    test_layer_gpu.py with the switch on
#   buckets  experiments/runner_buckets_ab.py (session 34's 1.5x graph buckets)
#   ep1      test_ep_gpu.py as one NCCL rank
#   ceiling  (an H200 only) device_read_ceiling.sh: copy / read rates, the decode record's rows
#   MOE_FP8_COMMIT=<sha> [STEPS="smoke tests kernel eager"] [DEVICE_BUDGET_S=560] \
#     bash benchmarks/device_dynamic_tiles.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUTDIR=${OUT:-/tmp/moe_fp8_out}; mkdir -p "$OUTDIR"
STEPS=${STEPS:-smoke tests kernel eager}
source benchmarks/device_steps.sh  # want, cap, step
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
# what the last recorded run compiled, built in parallel up front (jit/manifest.py; rc 1 names the
# test-only instances that spill); this run records its own list beside its logs
[ -f benchmarks/jit_manifest.jsonl ] && step precompile 90 python3 -m moe_fp8.gemm.precompile \
  --manifest benchmarks/jit_manifest.jsonl --workers 16
export MOE_FP8_JIT_MANIFEST="$OUTDIR/jit_manifest.jsonl"
SAN="compute-sanitizer --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 20"
SAN_K="matches_static and (128x256c2p4 or 128x128c1p3)"
# a hang would cost the whole call: one small case first, under a short limit
if want smoke; then
  step smoke 120 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_dynamic_tiles_gpu.py \
    -k "dynamic_matches_static and (128x128c1p3 or 128x256c2p4)"
  grep -q " passed" "$OUTDIR/smoke.log" && ! grep -q "failed" "$OUTDIR/smoke.log" || { echo "smoke failed: stop"; exit 1; }
fi
# the A/B before the whole test file: on a cold machine the tests compile ~30 instances
want kernel && step kernel 180 python3 benchmarks/experiments/dynamic_tiles_ab.py
want tests && step tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_dynamic_tiles_gpu.py
want eager && step eager 180 python3 benchmarks/experiments/eager_switch_ab.py \
  --env MOE_FP8_DYNAMIC_TILES=1 --tokens 1024,2048,4096,8192,16384
if want runner; then
  OUT="$OUTDIR" SWITCHES=MOE_FP8_DYNAMIC_TILES=1 TOKENS=768,1024,2048 PROFILE=0 \
    timeout "$(cap 200)" bash benchmarks/device_runner_sizes.sh
fi
if want san; then
  step memcheck 200 $SAN --tool memcheck python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_dynamic_tiles_gpu.py -k "$SAN_K" &
  step racecheck 200 $SAN --tool racecheck python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_dynamic_tiles_gpu.py -k "$SAN_K" &
  step synccheck 200 $SAN --tool synccheck python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_dynamic_tiles_gpu.py -k "$SAN_K" &
  wait
fi
want layer && step layer 150 env MOE_FP8_DYNAMIC_TILES=1 python3 -m pytest -q \
  -p no:cacheprovider -m gpu tests/test_layer_gpu.py
want buckets && step buckets 120 python3 benchmarks/experiments/runner_buckets_ab.py
want ep1 && step ep1 120 env MOE_FP8_EP_GPU_WORLD=1 python3 -m pytest -q -p no:cacheprovider \
  tests/test_ep_gpu.py
# issue 5's H200 decode rows (unmeasured since session 23) when the call lands on an H200
if want ceiling && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  OUT="$OUTDIR/ceiling" timeout "$(cap 200)" bash benchmarks/device_read_ceiling.sh
fi
echo "done t=${SECONDS}s"

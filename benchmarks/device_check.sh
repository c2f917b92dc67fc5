#!/usr/bin/env bash
# One device call for the whole package: precompile, the GPU tests (the least-proven first), the
# demo, then the layer / permute / training / EP benchmarks. Run it on nvidia-h100-x2 so the EP
# steps run across GPUs (on one GPU the EP test runs as one NCCL rank, the EP benchmark skips),
# from a snapshot of HEAD (the device gets the working tree):
#   git archive HEAD | tar -x -C .snap   # .snap/ is ignored; carry it, then in the call:
#   cd .snap && MOE_FP8_COMMIT=<sha> bash benchmarks/device_check.sh [full]
# `full` adds the GEMM/wgrad tables, the fuzzer and compute-sanitizer.
# PHASES picks groups of steps (space-separated): ab (GEMM A/B, needs .variants + AB_VARIANTS),
# tests, bench, gemm (tables), robust (fuzz + sanitizer); default "ab tests bench" (+ "gemm
# robust" with `full`). Everything does not fit one 600 s call: split it, e.g. PHASES="ab tests",
# then PHASES="bench gemm", then PHASES="robust".
# Each step has a time cap; a failing step leaves its log and the rest still run. At most 8
# files come back: the logs and result files travel in one tarball.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
FINAL="${OUT:-/tmp/moe_fp8_out}"
export OUT="$FINAL/raw"; mkdir -p "$OUT"
export MOE_FP8_CACHE_DIR="${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}"
summary="$OUT/summary.txt"; : > "$summary"
num_gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
PYTEST="python3 -m pytest -q -p no:cacheprovider"

budget=${DEVICE_BUDGET_S:-380}  # whole-call budget: a step that cannot fit is skipped, so the logs always come back
step() {  # step NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  if [ $((SECONDS + limit)) -gt "$budget" ]; then
    limit=$((budget - SECONDS))
    if [ "$limit" -lt 15 ]; then printf '%-16s skipped (budget)\n' "$name" | tee -a "$summary"; return; fi
  fi
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%-16s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -aE 'passed|failed|Error|error' "$OUT/$name.log" | tail -n 1 | cut -c1-110)" | tee -a "$summary"
}

default_phases="ab tests bench"; [ "${1:-}" = full ] && default_phases="ab tests bench gemm robust"
phases=" ${PHASES:-$default_phases} "
want() { [[ "$phases" == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
step precompile 90 python3 -m moe_fp8.gemm.precompile
# GEMM A/B (gemm_ab.py) when the snapshot carries kernel versions under .variants/ (see NOTES.md)
if want ab && [ -d .variants ] && [ -n "${AB_VARIANTS:-}" ]; then
  step gemm-ab 150 bash benchmarks/device_gemm_explore.sh "$AB_VARIANTS" "${AB_CONFIGS:-128x128c1d1}" \
    "${AB_SHAPES:-4096,4096,7168 4096,7168,2048}"
fi
if want tests; then
step test-gemm 200 $PYTEST -m gpu tests/test_gemm_gpu.py tests/test_wgrad_gpu.py
step test-kernels 150 $PYTEST -m gpu tests/test_quant_gpu.py tests/test_train_quant_gpu.py \
  tests/test_permute_gpu.py tests/test_router_gpu.py
step test-layer 150 $PYTEST -m gpu tests/test_layer_gpu.py tests/test_autograd.py \
  tests/test_errors_layer.py tests/test_nan_policy.py tests/test_jit.py
if [ "$num_gpus" -ge 2 ]; then step test-ep 70 $PYTEST tests/test_ep_gpu.py
# one GPU: the same cases as one NCCL rank (11 s on an H100, session 29): the EP code paths and
# their graph capture, no transfer between cards
else step test-ep-1rank 70 env MOE_FP8_EP_GPU_WORLD=1 $PYTEST tests/test_ep_gpu.py; fi
# programmatic dependent launch: the graph-captured and eager layer paths with the attribute on
step test-pdl 90 env MOE_FP8_PDL=1 $PYTEST -m gpu tests/test_layer_gpu.py tests/test_permute_gpu.py \
  tests/test_quant_gpu.py
step demo 40 python3 examples/deepseek_v3_moe.py
fi
if want bench; then
step bench-pdl 60 python3 benchmarks/bench_pdl.py --repeats 10
step bench-layer 50 python3 benchmarks/bench_layer.py --quick --repeats 5
step profile-layer 85 python3 benchmarks/profile_layer.py --tokens 4096 --repeats 3 --mode all
step bench-permute 40 python3 benchmarks/bench_permute.py --quick
step bench-train 60 python3 benchmarks/bench_train.py --quick --repeats 3
step bench-quant 60 python3 benchmarks/bench_quant.py --quick
step bench-masked 90 python3 benchmarks/bench_grouped.py --only masked --repeats 10 \
  --masked-configs "${MASKED_CONFIGS:-64x256c1d0,64x128c1d0,64x128c1d0a2,64x128c1d1r16}"
[ "$num_gpus" -ge 2 ] && step bench-ep 45 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
  benchmarks/bench_ep.py --quick --repeats 5 --profile
fi
if want gemm; then
  step bench-gemm 240 python3 benchmarks/bench_gemm.py --repeats 15 --sweep --sweep-m 64,128
  step bench-grouped 150 python3 benchmarks/bench_grouped.py --only contiguous --repeats 10
  step bench-wgrad 60 python3 benchmarks/bench_wgrad.py --repeats 10
fi
if want robust; then
  step fuzz 240 python3 tests/fuzz_gpu.py
  step sanitize 300 bash benchmarks/device_sanitize.sh
fi
cp benchmarks/results/*_"$(date +%F)"* "$OUT/" 2>/dev/null
{ grep -ahE "^\|" "$OUT/gemm-ab.log" 2>/dev/null; grep -ahE "^\|" "$OUT/bench-pdl.log" 2>/dev/null; grep -ahE "^\|" "$OUT/demo.log" "$OUT/bench-layer.log" | tail -n 24; } | cut -c1-160 > "$FINAL/tables.txt"
cp "$summary" "$FINAL/summary.txt"
tar czf "$FINAL/logs.tgz" -C "$OUT" . && rm -rf "$OUT"
cat "$FINAL/summary.txt"

#!/usr/bin/env bash
# One device call: environment facts, every `gpu` test, then the benchmark tables.
# Usage on the GPU machine (repo root):  bash benchmarks/device_check.sh [quick]
# Logs and results go under $OUT (the device tool brings them back); a summary prints last.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/moe_fp8_out}"; mkdir -p "$OUT"
export MOE_FP8_CACHE_DIR="${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}"
summary="$OUT/summary.txt"; : > "$summary"

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-28s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$summary"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
step precompile 300 python3 -m moe_fp8.gemm.precompile
step gpu-tests 400 python3 -m pytest -q -m gpu tests -x --timeout=300 -p no:cacheprovider
if [ "${1:-}" != "quick" ]; then
  for b in quant gemm grouped layer; do
    [ -f "benchmarks/bench_$b.py" ] && step "bench-$b" 300 python3 "benchmarks/bench_$b.py"
  done
fi
tail -n 3 "$OUT/gpu-tests.log"
cat "$summary"

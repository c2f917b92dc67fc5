#!/usr/bin/env bash
# One device call for the layer side on nvidia-h100-x2: GPU tests of the layer, training and
# expert parallelism, the demo, then the layer / training / EP benchmarks (quick sizes).
# Usage (repo root, GPU machine): MOE_FP8_COMMIT=<sha> bash benchmarks/device_layer.sh
# Step limits add up to < 420 s; a failing step leaves its log and the rest still run.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
FINAL="${OUT:-/tmp/moe_fp8_out}"
# at most 8 files come back: everything goes to a raw folder that is tarred at the end
export OUT="$FINAL/raw"; mkdir -p "$OUT"
export MOE_FP8_CACHE_DIR="${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}"
summary="$OUT/summary.txt"; : > "$summary"
RUN2="python3 -m torch.distributed.run --standalone --nproc-per-node 2"

step() {  # step NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -aE 'passed|failed|Error|error' "$OUT/$name.log" | tail -n 1 | cut -c1-120)" | tee -a "$summary"
}

nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
step precompile 60 python3 -m moe_fp8.gemm.precompile
step test-layer 100 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_layer_gpu.py tests/test_autograd.py
step test-ep 70 python3 -m pytest -q -p no:cacheprovider tests/test_ep_gpu.py
step demo 35 python3 examples/deepseek_v3_moe.py
step bench-layer 70 python3 benchmarks/bench_layer.py --quick --repeats 5
step bench-ep 45 $RUN2 benchmarks/bench_ep.py --quick --repeats 5
step bench-train 40 python3 benchmarks/bench_train.py --quick --repeats 3
cp benchmarks/results/*_"$(date +%F)"* "$OUT/" 2>/dev/null
grep -ahE "^\|" "$OUT/demo.log" "$OUT/bench-layer.log" | cut -c1-160 | tail -n 24 > "$FINAL/tables.txt"
cp "$summary" "$FINAL/summary.txt"
tar czf "$FINAL/logs.tgz" -C "$OUT" . && rm -rf "$OUT"
summary="$FINAL/summary.txt"; OUT="$FINAL"
cat "$summary"

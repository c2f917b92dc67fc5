#!/usr/bin/env bash
# Expert parallelism on 2 GPUs, ONE device call (kind nvidia-h100-x2): the NCCL EP test (graph-captured
# decode included), the example, the benchmark. Logs under $OUT; a summary prints last.
# Usage (repo root, GPU machine):  bash benchmarks/device_ep.sh [quick]
# Step limits add up to < 600 s (the per-call limit); quick (no example, one prefill size, decode at
# 16 experts) to 270 s. A step that fails leaves its log and the rest run.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/moe_fp8_ep_out}"; mkdir -p "$OUT"
export MOE_FP8_CACHE_DIR="${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}"  # shared by every step and rank
summary="$OUT/summary.txt"; : > "$summary"
RUN="python3 -m torch.distributed.run --standalone --nproc-per-node 2"

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%-16s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -aE 'passed|failed|worst|CHECK|Error' "$OUT/$name.log" | tail -n 1 | cut -c1-110)" | tee -a "$summary"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; nvidia-smi topo -m; } > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())" >> "$OUT/gpu.txt" 2>&1

quick=0; [ "${1:-}" = quick ] && quick=1
# 1. kernels for DeepSeek-V3 shapes, in parallel (a warm cache makes this a no-op)
step precompile $((quick ? 90 : 120)) python3 -m moe_fp8.gemm.precompile
# 2. correctness on 2 GPUs: EP == single GPU (prefill, graph decode at the 16-expert target)
step test-ep-gpu $((quick ? 100 : 230)) python3 -m pytest -q -rA -p no:cacheprovider tests/test_ep_gpu.py
if [ $? -ne 0 ] && [ $quick -eq 0 ] && [ $SECONDS -lt 200 ]; then  # EP or kernels? the same cases on the reference GEMMs
  step test-ep-gpu-ref 120 env MOE_FP8_BACKEND=reference python3 -m pytest -q -rA -p no:cacheprovider \
    tests/test_ep_gpu.py -k "tiny or oracle"
fi
# 3. the example (full run only): DeepSeek-V3 layer (256 experts, 128 per rank), 4096 prefill / 128 decode tokens per rank
[ $quick -eq 0 ] && step example 110 $RUN examples/ep_moe.py
# 4. bytes/s vs raw NCCL all-to-all, layer latency (results: benchmarks/results/ep_2gpu_<date>.*)
if [ $quick -eq 1 ]; then step bench 90 $RUN benchmarks/bench_ep.py --quick --repeats 10 --profile
else step bench 140 $RUN benchmarks/bench_ep.py --repeats 15 --profile; fi
cp benchmarks/results/ep_*gpu_* "$OUT/" 2>/dev/null

grep -aE "^rank [01] gpu_" "$OUT/test-ep-gpu.log" | cut -c1-150
[ -f "$OUT/example.log" ] && { grep -aE "^\|" "$OUT/example.log" | cut -c1-170; grep -aE "^prefill:|^worst" "$OUT/example.log"; }
grep -aE "^\|" "$OUT/bench.log" | cut -c1-150; grep -aE "^EP = " "$OUT/bench.log"
sed -n '/^profile, rank 0/,$p' "$OUT/bench.log" | grep -avE "USDT|^$" | cut -c1-200  # where the time goes
cat "$summary"

#!/usr/bin/env bash
# JIT + quantisation kernels, one device call: compile-path probe (times), JIT and quant GPU
# tests, compute-sanitizer memcheck on the quant kernels (small shapes), bandwidth benchmark.
# Logs under $OUT (tarred, plus the benchmark's md/csv); a short summary prints last.
# Usage (repo root, GPU machine): MOE_FP8_COMMIT=<sha> bash benchmarks/device_quant.sh [noprobe]
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
REAL_OUT="${OUT:-/tmp/moe_fp8_quant_out}"; mkdir -p "$REAL_OUT"
export OUT=/tmp/moe_fp8_quant_logs; rm -rf "$OUT"; mkdir -p "$OUT"
export MOE_FP8_CACHE_DIR=/tmp/moe_fp8_quant_cache; rm -rf "$MOE_FP8_CACHE_DIR"
summary="$OUT/summary.txt"; : > "$summary"
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-100)" | tee -a "$summary"
  tar czf "$REAL_OUT/quant_logs.tgz" -C "$OUT" . 2>/dev/null  # current even if the call is cut off
  return $rc
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1

# 1. every compile path on the probe (wgmma) kernel, then a small and a real kernel per path
[ "${1:-}" != noprobe ] && step probe 120 python3 -m moe_fp8.gemm.jit.probe
cat > /tmp/paths.py <<'PY'
# one compile path, one kernel, fresh cache: prints the compile time and the ptxas report
import os, sys, tempfile, torch
os.environ["MOE_FP8_COMPILER"], which = sys.argv[1], sys.argv[2]
os.environ["MOE_FP8_CACHE_DIR"] = tempfile.mkdtemp()
from moe_fp8.gemm import jit
if which == "quant":
    from moe_fp8.gemm.kernels import quant
    src = quant.per_token_source(torch.bfloat16, 128, False)
else:
    from moe_fp8.gemm.kernels import fp8_gemm
    src = fp8_gemm.bundled_sources()[0]
c = jit.compile_kernel(src)
print(f"{sys.argv[1]:12s} {which:6s} {c.compile_seconds:6.3f} s  {c.report}  {src.instance}")
PY
[ "${1:-}" != noprobe ] && step paths 120 bash -c 'for p in nvrtc nvrtc-ptxas nvcc; do for k in quant gemm; do
  [ "$p/$k" = nvrtc/gemm ] && continue  # wgmma: in-process cubin crashes on CUDA 13.0
  python3 /tmp/paths.py $p $k 2>&1 | tail -n 1; done; done'

# 2. tests: the JIT's GPU tests (its CPU tests run in CI) and the quant GPU tests
step tests 150 python3 -m pytest -q -p no:cacheprovider -s -m gpu tests/test_jit.py tests/test_quant_gpu.py

# 3. memcheck, small shapes, every quant kernel
cat > /tmp/san_quant.py <<'PY'
import torch
from moe_fp8.gemm.kernels import quant as Q
from moe_fp8.gemm.layout import empty_act_scales
F8 = torch.float8_e4m3fn
for dt in (torch.bfloat16, torch.float32):
    x = torch.randn(3, 37, 384, device="cuda").to(dt)
    Q.per_token_group_quant(x, torch.empty_like(x, dtype=F8), empty_act_scales(37, 3, 3, device="cuda"), 128, False)
    w = torch.randn(2, 200, 256, device="cuda").to(dt)
    Q.per_block_quant(w, torch.empty_like(w, dtype=F8), torch.empty(2, 2, 2, device="cuda"), 128, True)
h = torch.randn(5, 2 * 256, device="cuda").bfloat16()
Q.silu_and_mul_quant(h, torch.empty(5, 256, dtype=F8, device="cuda"), empty_act_scales(5, 2, device="cuda"), None, 128, False)
h = torch.randn(3, 9, 2 * 256, device="cuda").bfloat16()
mm = torch.tensor([0, 9, 4], dtype=torch.int32, device="cuda")
Q.silu_and_mul_quant(h, torch.empty(3, 9, 256, dtype=F8, device="cuda"), empty_act_scales(9, 2, 3, device="cuda"), mm, 128, False)
torch.cuda.synchronize(); print("sanitizer workload done")
PY
step memcheck 90 compute-sanitizer --tool memcheck --kernel-name kns=quant python3 /tmp/san_quant.py

# 4. bandwidth
step bench 150 python3 benchmarks/bench_quant.py --repeats 30
cp benchmarks/results/bench_quant_*.md benchmarks/results/bench_quant_*.csv "$REAL_OUT/" 2>/dev/null

grep -E "passed|failed" "$OUT/tests.log" | tail -n 2
grep -E "^\[jit\]" "$OUT/tests.log"
grep -aE "ERROR SUMMARY" "$OUT/memcheck.log"
cat "$OUT/probe.log" "$OUT/paths.log" 2>/dev/null
grep -E "^\|" "$OUT/bench.log" | cut -c1-170; grep -E "ceiling" "$OUT/bench.log"
cat "$summary"
tar czf "$REAL_OUT/quant_logs.tgz" -C "$OUT" .; cp "$summary" "$REAL_OUT/"

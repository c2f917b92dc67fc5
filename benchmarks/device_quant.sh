#!/usr/bin/env bash
# Quantisation kernels (quant.cuh, and the training ones: transpose_quant.cuh, silu_backward.cuh),
# one device call: compile every quant variant once (shared JIT cache),
# then the quant GPU tests and a compute-sanitizer memcheck of every quant kernel side by side
# (both only check correctness, so they may share the card), then the bandwidth benchmark alone.
# bench_quant times every per-token/SiLU kernel variant beside the dispatched one (same process).
# Optional first argument "probe": also time the JIT's compile paths (python -m moe_fp8.gemm.jit.probe).
# Logs under $OUT (tarred, plus the benchmark's md/csv); a short summary prints last.
# Usage (repo root, GPU machine): MOE_FP8_COMMIT=<sha> bash benchmarks/device_quant.sh [probe]
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
REAL_OUT="${OUT:-/tmp/moe_fp8_quant_out}"; mkdir -p "$REAL_OUT"
export OUT=/tmp/moe_fp8_quant_logs; rm -rf "$OUT"; mkdir -p "$OUT"
export MOE_FP8_CACHE_DIR=/tmp/moe_fp8_quant_cache; rm -rf "$MOE_FP8_CACHE_DIR"
summary="$OUT/summary.txt"; : > "$summary"
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%-9s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-110)" | tee -a "$summary"
  tar czf "$REAL_OUT/quant_logs.tgz" -C "$OUT" . 2>/dev/null  # current even if the call is cut off
  return $rc
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1

# 0. compile (parallel): every bundled quant variant + the not-dispatched variants tests/bench use
step compile 60 python3 - <<'PY'
from moe_fp8.gemm.precompile import precompile
from moe_fp8.gemm.kernels import quant as Q, silu_backward as S, transpose_quant as T
import torch
sources = Q.bundled_sources() + Q.bundled_oneshot_sources() + T.bundled_sources() + S.bundled_sources()
for pow2 in (False, True):
    sources += [Q.per_token_oneshot_source(dt, 128, pow2, h) for dt in (torch.bfloat16, torch.float32) for h in (False, True)]
    sources += [Q.silu_oneshot_source(128, pow2, h) for h in (False, True)]
done = precompile(list(dict.fromkeys(sources)), verbose=False)
print(f"{len(done)} kernels, max registers {max(c.registers for c in done)}, "
      f"local memory in {sum(c.report.uses_local_memory for c in done)}")
PY
[ "${1:-}" = probe ] && step probe 120 python3 -m moe_fp8.gemm.jit.probe

# 1. memcheck workload: small shapes reaching every kernel and path (grid-stride wrap, 3-D
#    batches, masked prefix tiles and clamping, inf/NaN groups, SiLU divisors >= 2^126)
cat > /tmp/san_quant.py <<'PY'
import torch
from moe_fp8.gemm.kernels import quant as Q
from moe_fp8.gemm.layout import empty_act_scales
F8 = torch.float8_e4m3fn
for dt in (torch.bfloat16, torch.float32):
    x = torch.randn(3, 37, 384, device="cuda").to(dt)
    Q.per_token_group_quant(x, torch.empty_like(x, dtype=F8), empty_act_scales(37, 3, 3, device="cuda"), 128, False)
    x = torch.randn(2048, 1152, device="cuda").to(dt)  # 147k chunks: more than one machine of threads
    x[5, 7] = float("inf")
    for v in ("stream", "oneshot"):
        Q.per_token_group_quant(x, torch.empty_like(x, dtype=F8), empty_act_scales(2048, 9, device="cuda"), 128, True, variant=v)
    w = torch.randn(2, 200, 256, device="cuda").to(dt)
    Q.per_block_quant(w, torch.empty_like(w, dtype=F8), torch.empty(2, 2, 2, device="cuda"), 128, True)
h = torch.randn(5, 2 * 256, device="cuda").bfloat16()
h[1, :256] = -88.0; h[2, 3] = float("nan")
for v in ("stream", "oneshot"):
    Q.silu_and_mul_quant(h, torch.empty(5, 256, dtype=F8, device="cuda"), empty_act_scales(5, 2, device="cuda"), None, 128, False, variant=v)
h = torch.randn(3, 9, 2 * 256, device="cuda").bfloat16()
mm = torch.tensor([0, 9, 4], dtype=torch.int32, device="cuda")
Q.silu_and_mul_quant(h, torch.empty(3, 9, 256, dtype=F8, device="cuda"), empty_act_scales(9, 2, 3, device="cuda"), mm, 128, False)
h = torch.randn(600, 2, 2 * 128, device="cuda").bfloat16()
mm = torch.randint(-1, 4, (600,), dtype=torch.int32, device="cuda")
Q.silu_and_mul_quant(h, torch.empty(600, 2, 128, dtype=F8, device="cuda"), empty_act_scales(2, 1, 600, device="cuda"), mm, 128, True)
# training kernels: partial token tiles, odd T (byte stores), row masks, the requantising path
from moe_fp8.gemm.kernels import silu_backward as S, transpose_quant as T
w = torch.randn(2, 256, 384, device="cuda")
T.per_block_quant_transpose(w, torch.empty_like(w, dtype=F8), torch.empty(2, 2, 3, device="cuda"),
                            torch.empty(2, 384, 256, dtype=F8, device="cuda"), torch.empty(2, 3, 2, device="cuda"), 128, False)
mi = torch.tensor([0] * 100 + [-1] * 28 + [1] * 173, dtype=torch.int32, device="cuda")
for t, mask in ((301, mi), (7, None), (256, None)):
    x = torch.randn(t, 256, device="cuda").bfloat16()
    T.token_transpose_quant(x, torch.empty(256, t, dtype=F8, device="cuda"), empty_act_scales(256, -(-t // 128), device="cuda"), 128, False, mask)
x = torch.randn(301, 256, device="cuda")
a, sa = torch.empty(301, 256, dtype=F8, device="cuda"), empty_act_scales(301, 2, device="cuda")
Q.per_token_group_quant(x, a, sa, 128, False)
T.token_transpose_requant(a, sa, mi, torch.empty(256, 301, dtype=F8, device="cuda"), empty_act_scales(256, 3, device="cuda"), 128, False)
for m in (1, 301):
    d, h = torch.randn(m, 256, device="cuda").bfloat16(), torch.randn(m, 512, device="cuda").bfloat16()
    S.silu_and_mul_backward_quant(d, h, torch.empty(m, 512, dtype=F8, device="cuda"), empty_act_scales(m, 4, device="cuda"),
                                  torch.empty(512, m, dtype=F8, device="cuda"), empty_act_scales(512, -(-m // 128), device="cuda"),
                                  torch.empty(256, m, dtype=F8, device="cuda"), empty_act_scales(256, -(-m // 128), device="cuda"), 128, False)
torch.cuda.synchronize(); print("sanitizer workload done")
PY

# 2. tests and memcheck side by side, then the benchmark alone
step tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant_gpu.py tests/test_train_quant_gpu.py &
step memcheck 150 compute-sanitizer --tool memcheck --kernel-name kns=quant python3 /tmp/san_quant.py &
wait
step bench 120 python3 benchmarks/bench_quant.py --repeats 30
cp benchmarks/results/bench_quant_*.md benchmarks/results/bench_quant_*.csv "$REAL_OUT/" 2>/dev/null

grep -E "passed|failed|Error|error" "$OUT/tests.log" | tail -n 8
grep -aE "ERROR SUMMARY|Invalid|out of bounds" "$OUT/memcheck.log" | head -n 5
cat "$OUT/gpu.txt"
grep -E "^\|" "$OUT/bench.log" | cut -c1-190; grep -E "ceiling" "$OUT/bench.log"
cat "$summary"
tar czf "$REAL_OUT/quant_logs.tgz" -C "$OUT" .; cp "$summary" "$REAL_OUT/"

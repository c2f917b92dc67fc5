#!/usr/bin/env bash
# FP8 GEMM family, one device call: parallel precompile, smoke test, SASS check, GPU tests,
# compute-sanitizer (memcheck + racecheck, small shapes), benchmarks. Logs under $OUT; a short
# table prints last.   Usage (repo root, GPU machine): bash benchmarks/device_gemm.sh [quick]
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
# $OUT returns at most 8 files: everything goes to a work dir, tarred into $OUT at the end.
REAL_OUT="${OUT:-/tmp/moe_fp8_gemm_out}"; mkdir -p "$REAL_OUT"
export OUT=/tmp/moe_fp8_gemm_logs; rm -rf "$OUT"; mkdir -p "$OUT"
export MOE_FP8_CACHE_DIR="${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}"
summary="$OUT/summary.txt"; : > "$summary"
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)" | tee -a "$summary"
  tar czf "$REAL_OUT/gemm_logs.tgz" -C "$OUT" . 2>/dev/null  # kept current in case the call is cut off
  return $rc
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1

step precompile 90 python3 - <<'PY'
# Compile, 16 processes at once, every instance the tests and benchmarks will ask for.
import sys, time, concurrent.futures as cf
sys.path[:0] = ["tests", "benchmarks"]
from moe_fp8.gemm import jit, heuristics as H
from moe_fp8.gemm.kernels import fp8_gemm as F
import test_gemm_gpu as T, bench_gemm as B
S = 132
src = list(F.bundled_sources())
for m, n, k in T.kDenseTargets + T.kDenseOdd:
    src.append(F.kernel_source(n, k, H.dense_config(m, n, k, S), 0))
for c in T.kPinned:
    src.append(F.kernel_source(2128, 1536, c.resolved(1536), 0))
for (m, n, k), cs in B.kSweep.items():
    src += [F.kernel_source(n, k, c.resolved(k), 0) for c in cs]
src = list(dict.fromkeys(src))
t = time.time()
def one(s):
    c = jit.compile_kernel(s)
    return s.instance, c.registers, c.spill_bytes
with cf.ProcessPoolExecutor(16) as ex:
    res = list(ex.map(one, src))
bad = [r for r in res if r[2]]
print("\n".join(f"{i} regs={r} spill={sp}" for i, r, sp in res))
print(f"compiled {len(res)} instances in {time.time() - t:.1f}s; with spills: {len(bad)}")
PY

step smoke 60 python3 - <<'PY'
import torch, moe_fp8.gemm as G
from moe_fp8.gemm import reference as ref
from moe_fp8.gemm.layout import empty_act_scales
torch.manual_seed(0)
for m, n, k in ((256, 512, 256), (77, 2112, 7168), (4096, 7168, 2048)):
    x = torch.randn(m, k, device="cuda").bfloat16(); w = torch.randn(n, k, device="cuda").bfloat16()
    qa, s = ref.per_token_group_quant(x); sa = empty_act_scales(m, k // 128, device="cuda"); sa.copy_(s)
    qb, sb = ref.per_block_quant(w)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    G.fp8_gemm_nt((qa, sa), (qb, sb), out=out, backend="kernel"); torch.cuda.synchronize()
    r = G.fp8_gemm_nt((qa, sa), (qb, sb), backend="reference")
    print(m, n, k, "nan:", int(torch.isnan(out).sum()), "diff_ref:", G.calc_diff(out, r),
          "diff_fp32:", G.calc_diff(out, x.float() @ w.float().t()))
print("smoke done")
PY
smoke_rc=$?

step sass 30 bash -c 'python3 - <<PY
from moe_fp8.gemm import jit, heuristics as H
from moe_fp8.gemm.kernels import fp8_gemm as F
print(jit.compile_kernel(F.kernel_source(7168, 2048, H.GemmConfig(128, 128).resolved(2048), 0)).cubin_path)
PY
' 
cubin=$(tail -n 1 "$OUT/sass.log")
cuobjdump --dump-sass "$cubin" > "$OUT/sass_dense.txt" 2>&1
echo "128x128 dense SASS: QGMMA=$(grep -c QGMMA "$OUT/sass_dense.txt") LDL/STL=$(grep -cE 'LDL|STL' "$OUT/sass_dense.txt") FFMA=$(grep -c FFMA "$OUT/sass_dense.txt") DEPBAR=$(grep -c 'WARPGROUP.DEPBAR' "$OUT/sass_dense.txt")" | tee -a "$summary"

if [ $smoke_rc -eq 0 ]; then
  step tests 200 python3 -m pytest -q tests/test_gemm_gpu.py -p no:cacheprovider -q
  if [ "${1:-}" != "quick" ]; then
    step bench-gemm 120 python3 benchmarks/bench_gemm.py --sweep --repeats 20
    step bench-grouped 90 python3 benchmarks/bench_grouped.py --repeats 15
  fi
  cat > /tmp/san.py <<'PY'
import torch, moe_fp8.gemm as G
from moe_fp8.gemm import reference as ref
from moe_fp8.gemm.layout import empty_act_scales, build_m_indices
def wq(w):
    q, s = ref.per_block_quant(w); return q.contiguous(), s
def act(x):
    q, s = ref.per_token_group_quant(x); sm = empty_act_scales(x.shape[-2], s.shape[-1], x.shape[0] if x.dim() == 3 else None, device="cuda"); sm.copy_(s); return q, sm
x = torch.randn(200, 384, device="cuda").bfloat16(); w = torch.randn(3, 272, 384, device="cuda").bfloat16()
G.fp8_gemm_nt(act(x), wq(w[0]), backend="kernel")
mi = build_m_indices([70, 0, 100], device="cuda")
G.m_grouped_fp8_gemm_nt_contiguous(act(torch.randn(mi.shape[0], 384, device="cuda").bfloat16()), wq(w), mi, backend="kernel")
G.m_grouped_fp8_gemm_nt_masked(act(torch.randn(3, 100, 384, device="cuda").bfloat16()), wq(w), torch.tensor([100, 0, 37], dtype=torch.int32, device="cuda"), 50, backend="kernel")
torch.cuda.synchronize(); print("sanitizer workload done")
PY
  step memcheck 50 compute-sanitizer --tool memcheck --kernel-name kns=fp8_gemm python3 /tmp/san.py
  step racecheck 50 compute-sanitizer --tool racecheck --kernel-name kns=fp8_gemm python3 /tmp/san.py
fi
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
grep -E "ERROR SUMMARY|hazard" "$OUT/memcheck.log" "$OUT/racecheck.log" 2>/dev/null | tail -n 4
[ -f "$OUT/bench-gemm.log" ] && grep -E "^\| (64|128|4096) " "$OUT/bench-gemm.log" | cut -c1-150
[ -f "$OUT/bench-gemm.log" ] && grep -i "geometric" "$OUT/bench-gemm.log"
cat "$summary"
tar czf "$REAL_OUT/gemm_logs.tgz" -C "$OUT" . && cp "$summary" "$REAL_OUT/"

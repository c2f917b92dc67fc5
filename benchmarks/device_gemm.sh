#!/usr/bin/env bash
# FP8 GEMM family (dense / grouped NT, k-grouped wgrad), one device call: parallel precompile,
# smoke (each new path once, short limit: a hang shows here), GPU tests, compute-sanitizer
# (memcheck + racecheck, small shapes), benchmarks with sweeps, SASS counts, a short ncu look.
# Logs under $OUT (tarred after every step); a short table prints last.
#   Usage (repo root, GPU machine): bash benchmarks/device_gemm.sh [STEPS] [BASELINE_DIR]
#   STEPS: comma-separated subset of tests,sweep,gemm,wgrad,grouped,sanitize,sass,ncu
#          (default all but grouped; "sweep" adds --sweep to the gemm and wgrad benchmarks)
#   BASELINE_DIR: headers of an earlier kernel version (bench_gemm.py --baseline), e.g. .v2
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
STEPS=",${1:-tests,sweep,gemm,wgrad,sanitize,sass,ncu},"; BASELINE="${2:-}"
want() { [[ "$STEPS" == *",$1,"* ]]; }
SWEEP=""; want sweep && SWEEP="--sweep"
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

step precompile 60 python3 - "$BASELINE" <<'PY'
# Compile, 16 processes at once, every instance the tests and benchmarks will ask for.
import os, sys, time, concurrent.futures as cf
sys.path[:0] = ["tests", "benchmarks"]
from moe_fp8.gemm import jit, heuristics as H
from moe_fp8.gemm.kernels import fp8_gemm as F, wgrad as W
import test_gemm_gpu as T, test_wgrad_gpu as TW, bench_gemm as B, bench_wgrad as BW
S = 132
src = list(jit.bundled_sources())
for m, n, k in T.kDenseTargets + T.kDenseOdd:
    src.append(F.kernel_source(n, k, H.dense_config(m, n, k, S), 0))
for c in T.kPinned:
    src.append(F.kernel_source(2128, 1536, c.resolved(1536), 0))
for (m, n, k), cs in B.kSweep.items():
    src += [F.kernel_source(n, k, c.resolved(k), 0) for c in cs]
for c in TW.kPinned + BW.kSweep:
    for n in (800, 2048, 7168):
        src.append(W.kernel_source(n, c.resolved(0, wgrad=True)))
for m, n in ((7168, 2048), (4096, 7168), (256, 384), (200, 160), (64, 96), (333, 1024), (256, 256)):
    src.append(W.kernel_source(n, H.wgrad_config(m, n, S)))
if sys.argv[1]:
    base = os.path.abspath(os.path.join(sys.argv[1], "fp8_gemm.cuh"))
    for m, n, k in T.kDenseTargets[12:]:
        stages = max(s for s in range(2, 11) if B._v2_smem(128, 128, s, k) <= 232448)
        src.append(jit.KernelSource(base, f"moe_fp8::fp8_gemm_kernel<{n}, {k}, 128, 128, {stages}, 16, 0, 1>"))
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

step smoke 45 python3 - <<'PY'
# Each new path once on a mid-size shape (a deadlock or a wrong result shows here, fast).
import torch, moe_fp8.gemm as G
from moe_fp8.gemm import reference as ref
from moe_fp8.gemm.heuristics import GemmConfig
from moe_fp8.gemm.layout import empty_act_scales
def act(x):
    q, s = ref.per_token_group_quant(x); sm = empty_act_scales(x.shape[0], s.shape[1], device="cuda"); sm.copy_(s); return q, sm
torch.manual_seed(0)
for m, n, k, c in ((256, 512, 256, GemmConfig(128, 128)), (384, 2112, 1536, GemmConfig(128, 128, cluster_m=2)),
                   (4096, 7168, 2048, None)):
    x = torch.randn(m, k, device="cuda").bfloat16(); w = torch.randn(n, k, device="cuda").bfloat16()
    qb, sb = ref.per_block_quant(w)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    G.fp8_gemm_nt(act(x), (qb, sb), out=out, backend="kernel", config=c); torch.cuda.synchronize()
    r = G.fp8_gemm_nt(act(x), (qb, sb), backend="reference")
    if c is not None and c.cluster_m > 1:
        from moe_fp8.gemm.kernels import fp8_gemm as F
        print("max active clusters (kernel, size, threads, smem) -> count:", list(F._active_clusters.values()))
    print("dense", m, n, k, c and c.cluster_m, "nan:", int(torch.isnan(out).sum()), "diff_ref:", G.calc_diff(out, r),
          "diff_fp32:", G.calc_diff(out, x.float() @ w.float().t()))
for m, n, counts in ((256, 256, [256, 0, 384]), (7168, 2048, [4096, 4096])):
    t = sum(counts); xa = torch.randn(m, t, device="cuda").bfloat16(); xb = torch.randn(n, t, device="cuda").bfloat16()
    off = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    out = torch.zeros(len(counts), m, n, device="cuda"); want = torch.zeros_like(out)
    G.k_grouped_fp8_gemm_tn_contiguous(act(xa), act(xb), off, out, backend="kernel"); torch.cuda.synchronize()
    G.k_grouped_fp8_gemm_tn_contiguous(act(xa), act(xb), off, want, backend="reference")
    print("wgrad", m, n, counts, "diff_ref:", G.calc_diff(out, want), "empty untouched:", bool((out[1] == 0).all()) if counts[1] == 0 else "-")
print("smoke done")
PY
smoke_rc=$?

if [ $smoke_rc -eq 0 ] && want tests; then
  step tests-gemm 100 python3 -m pytest -q tests/test_gemm_gpu.py -p no:cacheprovider -x
  step tests-wgrad 60 python3 -m pytest -q tests/test_wgrad_gpu.py -p no:cacheprovider
fi
if [ $smoke_rc -eq 0 ]; then
  want gemm && step bench-gemm 100 python3 benchmarks/bench_gemm.py $SWEEP --repeats 20 ${BASELINE:+--baseline "$BASELINE"}
  want wgrad && step bench-wgrad 60 python3 benchmarks/bench_wgrad.py $SWEEP --repeats 15
  want grouped && step bench-grouped 90 python3 benchmarks/bench_grouped.py --repeats 10
fi
if [ $smoke_rc -eq 0 ] && want sanitize; then
  cat > /tmp/san.py <<'PY'
import torch, moe_fp8.gemm as G
from moe_fp8.gemm import reference as ref
from moe_fp8.gemm.heuristics import GemmConfig
from moe_fp8.gemm.kernels import wgrad as W
from moe_fp8.gemm.layout import empty_act_scales, build_m_indices
def wq(w):
    q, s = ref.per_block_quant(w); return q.contiguous(), s
def act(x):
    q, s = ref.per_token_group_quant(x); sm = empty_act_scales(x.shape[-2], s.shape[-1], x.shape[0] if x.dim() == 3 else None, device="cuda"); sm.copy_(s); return q, sm
x = torch.randn(200, 384, device="cuda").bfloat16(); w = torch.randn(3, 272, 384, device="cuda").bfloat16()
G.fp8_gemm_nt(act(x), wq(w[0]), backend="kernel")
G.fp8_gemm_nt(act(x), wq(w[0]), backend="kernel", config=GemmConfig(128, 128, cluster_m=2))
mi = build_m_indices([70, 0, 100], device="cuda")
G.m_grouped_fp8_gemm_nt_contiguous(act(torch.randn(mi.shape[0], 384, device="cuda").bfloat16()), wq(w), mi, backend="kernel")
G.m_grouped_fp8_gemm_nt_masked(act(torch.randn(3, 100, 384, device="cuda").bfloat16()), wq(w), torch.tensor([100, 0, 37], dtype=torch.int32, device="cuda"), 50, backend="kernel")
a, b = act(torch.randn(200, 640, device="cuda").bfloat16()), act(torch.randn(160, 640, device="cuda").bfloat16())
off = torch.tensor([0, 256, 256, 640], dtype=torch.int32, device="cuda"); out = torch.zeros(3, 200, 160, device="cuda")
for c in (GemmConfig(128, 128), GemmConfig(128, 128, cluster_m=2), GemmConfig(64, 128)):
    W.k_grouped_tn(a[0], a[1], b[0], b[1], off, out, c)
torch.cuda.synchronize(); print("sanitizer workload done")
PY
  step memcheck 40 compute-sanitizer --tool memcheck --kernel-name kns=moe_fp8 python3 /tmp/san.py
  step racecheck 45 compute-sanitizer --tool racecheck --kernel-name kns=moe_fp8 python3 /tmp/san.py
fi
want sass && step sass 20 python3 - <<'PY'
# SASS of the shipped large-M instances: QGMMA present, no local memory, wgmma not serialised.
import subprocess
from moe_fp8.gemm import jit, heuristics as H
from moe_fp8.gemm.kernels import fp8_gemm as F, wgrad as W
for name, src in (("dense 4096x7168x2048", F.kernel_source(7168, 2048, H.dense_config(4096, 7168, 2048, 132), 0)),
                  ("wgrad 7168x2048", W.kernel_source(2048, H.wgrad_config(7168, 2048, 132)))):
    sass = subprocess.run(["cuobjdump", "--dump-sass", str(jit.compile_kernel(src).cubin_path)], capture_output=True, text=True).stdout
    n = lambda s: sum(s in l for l in sass.splitlines())
    print(f"{name}: QGMMA={n('QGMMA')} LDL/STL={n('LDL') + n('STL')} FFMA={n('FFMA')} FMUL={n('FMUL')} WARPGROUP.DEPBAR={n('WARPGROUP.DEPBAR')} WARPGROUP.ARRIVE={n('WARPGROUP.ARRIVE')}")
PY
if [ $smoke_rc -eq 0 ] && want ncu; then
  cat > /tmp/ncu.py <<'PY'
import sys, torch
sys.path.insert(0, "benchmarks")
from bench_gemm import make_inputs
from moe_fp8.gemm.heuristics import GemmConfig
from moe_fp8.gemm.kernels import fp8_gemm as K
qa, sa, qb, sb = make_inputs(4096, 4096, 7168)
out = torch.empty(4096, 4096, dtype=torch.bfloat16, device="cuda")
for c in (GemmConfig(128, 128, cluster_m=1), GemmConfig(128, 128, cluster_m=2)):
    K.fp8_gemm_nt(qa, sa, qb, sb, out, c); K.fp8_gemm_nt(qa, sa, qb, sb, out, c)
torch.cuda.synchronize()
PY
  step ncu 40 ncu --kernel-name regex:fp8_gemm --launch-skip 0 --launch-count 4 --metrics gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed,lts__t_bytes.sum.per_second,lts__t_sectors_srcunit_tex_op_read.sum,l1tex__m_xbar2l1tex_read_bytes.sum.per_second,dram__bytes_read.sum.per_second python3 /tmp/ncu.py
fi
grep -E "passed|failed|error" "$OUT"/tests-*.log 2>/dev/null | tail -n 4
grep -E "ERROR SUMMARY|hazard" "$OUT/memcheck.log" "$OUT/racecheck.log" 2>/dev/null | tail -n 4
grep -E "QGMMA" "$OUT/sass.log"
grep -E "diff|nan" "$OUT/smoke.log" | cut -c1-120
[ -f "$OUT/bench-gemm.log" ] && grep -E "^\| 4096 " "$OUT/bench-gemm.log" | cut -c1-200 | head -n 40
[ -f "$OUT/bench-gemm.log" ] && grep -i "geometric" "$OUT/bench-gemm.log"
[ -f "$OUT/bench-wgrad.log" ] && grep -E "^\| (record|GEMM1|32)" "$OUT/bench-wgrad.log" | cut -c1-200
cat "$summary"
tar czf "$REAL_OUT/gemm_logs.tgz" -C "$OUT" . && cp "$summary" "$REAL_OUT/"

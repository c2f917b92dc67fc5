#!/usr/bin/env bash
# Where a dense FP8 GEMM spends its cycles: one ncu "full" profile (with per-SASS-instruction
# warp-stall sampling) of one launch, exported as text pages (no ncu on the CPU machines).
#   bash benchmarks/ncu_gemm.sh M N K [BLOCK_M BLOCK_N CLUSTER_M DOUBLE_BUFFER]   (logs under $OUT)
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
M=${1:-4096} N=${2:-4096} K=${3:-7168}
OUTDIR="${OUT:-/tmp/ncu_out}"; mkdir -p "$OUTDIR"
tag="ncu_${M}x${N}x${K}${4:+_$4x$5c$6d$7}"
cat > /tmp/ncu_gemm.py <<PY
import sys, torch
sys.path.insert(0, "benchmarks")
from bench_gemm import make_inputs
from moe_fp8.gemm import heuristics as H
from moe_fp8.gemm.kernels import fp8_gemm as K
m, n, k = $M, $N, $K
qa, sa, qb, sb = make_inputs(m, n, k)
out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
c = H.GemmConfig(${4:-128}, ${5:-128}, cluster_m=${6:-1}, double_buffer=${7:-1}) if "${4:-}" else None
print("config:", c or H.dense_config(m, n, k, 132))
for _ in range(2):
    K.fp8_gemm_nt(qa, sa, qb, sb, out, c)
torch.cuda.synchronize()
PY
ncu --set full --import-source no --clock-control none --kernel-name regex:fp8_gemm \
    --launch-skip 1 --launch-count 1 -f -o "/tmp/$tag" python3 /tmp/ncu_gemm.py > "$OUTDIR/$tag.log" 2>&1
ncu -i "/tmp/$tag.ncu-rep" --page details > "$OUTDIR/$tag.details.txt" 2>&1
ncu -i "/tmp/$tag.ncu-rep" --page raw --csv > "$OUTDIR/$tag.raw.csv" 2>&1
ncu -i "/tmp/$tag.ncu-rep" --page source --print-source sass --csv > "$OUTDIR/$tag.sass.csv" 2>&1
grep -E "Duration|Issue Slots Busy|Tensor|Stall|Warp Cycles Per Issued|Achieved Occupancy" "$OUTDIR/$tag.details.txt" | head -n 30

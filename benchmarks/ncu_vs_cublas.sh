#!/usr/bin/env bash
# Ours vs cuBLAS blockwise on one dense FP8 GEMM under ncu at a fixed clock (`--clock-control
# base`): at the power cap time follows energy, so the per-clock schedule (tensor-pipe share,
# instructions, bytes moved at each level) is compared here with the clock held equal.
#   bash benchmarks/ncu_vs_cublas.sh M N K [name=include_folder | name=cfg:CONFIG ...]
# Each extra argument also profiles ours built from that include tree (e.g. ab_variants.py's
# ablations) with the shipped config, or (cfg:) the tree as it is under a pinned config
# (gemm_ab syntax). Logs under $OUT; prints one table: a row per metric, a column per kernel.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
M=${1:-4096} N=${2:-4096} K=${3:-7168}
shift 3 2>/dev/null || true
OUTDIR="${OUT:-/tmp/ncu_out}"; mkdir -p "$OUTDIR"
tag="ncu_vs_cublas_${M}x${N}x${K}"
cat > /tmp/ncu_vs_cublas.py <<PY
import sys, torch
sys.path.insert(0, "benchmarks")
from bench_gemm import cublas_blockwise, make_inputs
from gemm_ab import kernels_from, parse_config
from moe_fp8.gemm.kernels import fp8_gemm as K
m, n, k = $M, $N, $K
variants = [a.split("=", 1) for a in sys.argv[1:]]
qa, sa, qb, sb = make_inputs(m, n, k)
out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
sa_cublas = torch.empty(k // 128, m, device="cuda").t().copy_(sa)
blockwise = cublas_blockwise()
def ours(folder=None):
    if folder is None or folder.startswith("cfg:"):
        K.fp8_gemm_nt(qa, sa, qb, sb, out, folder and parse_config(folder[4:]))
    else:
        with kernels_from(folder):
            K.fp8_gemm_nt(qa, sa, qb, sb, out)
runs = [("ours", ours), ("cublas", lambda: blockwise(qa, sa_cublas, qb, sb))]
runs += [(name, lambda f=folder: ours(f)) for name, folder in variants]
for _ in range(2):  # compile, descriptors, cuBLAS heuristics
    for _, fn in runs:
        fn()
torch.cuda.synchronize()
for name, fn in runs:  # one profiled range per kernel, in this order
    torch.cuda.nvtx.range_push("prof")
    fn()
    torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
print("profiled:", [name for name, _ in runs])
PY
ncu --set full --import-source no --clock-control base --nvtx --nvtx-include "prof/" \
    -f -o "/tmp/$tag" python3 /tmp/ncu_vs_cublas.py "$@" > "$OUTDIR/$tag.log" 2>&1
echo "ncu rc=$?"; grep -a "profiled:" "$OUTDIR/$tag.log"
ncu -i "/tmp/$tag.ncu-rep" --page details > "$OUTDIR/$tag.details.txt" 2>&1
ncu -i "/tmp/$tag.ncu-rep" --page raw --csv > "$OUTDIR/$tag.raw.csv" 2>&1
python3 - "$OUTDIR/$tag.raw.csv" "$OUTDIR/$tag.log" <<'PY'
import ast, csv, re, sys
rows = list(csv.reader(open(sys.argv[1])))
runs = [ast.literal_eval(line.split("profiled:", 1)[1].strip(" \x00\n"))
        for line in open(sys.argv[2], errors="replace") if "profiled:" in line]
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
names, units, data = rows[head], rows[head + 1], rows[head + 2:]
want = [r"^gpu__time_duration\.sum$", r"^sm__cycles_elapsed\.avg\.per_second$",
        r"^sm__cycles_elapsed\.max$", r"^launch__(grid_size|block_size|registers_per_thread|cluster_dim_x)$",
        r"gmma.*pct_of_peak_sustained_(active|elapsed)$", r"^sm__inst_executed\.sum$",
        r"^sm__inst_executed_pipe_[a-z_]+\.sum$", r"^smsp__inst_executed_op_[a-z_]+\.sum$",
        r"^sm__sass_thread_inst_executed_op_(ffma|fmul|fadd)_pred_on\.sum$",
        r"^dram__bytes_(read|write)\.sum$", r"^lts__t_bytes\.sum$", r"^lts__t_sector_hit_rate\.pct$",
        r"^lts__t_sectors_srcunit_tex\.sum$",
        r"^l1tex__data_pipe_lsu_wavefronts_mem_shared(_op_ld|_op_st)?\.sum$",
        r"^l1tex__data_bank_(reads|writes)\.sum$", r"^smsp__warp_issue_stalled_[a-z_]+_per_warp_active\.pct$",
        r"^sm__throughput\.avg\.pct_of_peak_sustained_elapsed$",
        r"^smsp__issue_active\.avg\.pct_of_peak_sustained_active$"]
cols = [i for i, nm in enumerate(names) if any(re.search(w, nm) for w in want)]
kernels = [r[names.index("Kernel Name")][:40] for r in data]
if runs and len(runs[0]) == len(kernels):  # one kernel per profiled range: name them by run
    kernels = [f"{run}: {k[:24]}" for run, k in zip(runs[0], kernels)]
print("| metric | unit | " + " | ".join(kernels) + " |")
print("|---|---|" + "---|" * len(kernels))
for i in cols:
    vals = [r[i] for r in data]
    if all(v in ("", "0", "n/a") for v in vals):
        continue
    print(f"| {names[i]} | {units[i]} | " + " | ".join(vals) + " |")
PY

#!/usr/bin/env bash
# Is the decode step's floor (weight bytes / copy rate) reachable by a read-only stream on this
# card? (~2 min; NOTES, session 28: ncu put the H100's decode GEMMs at 87-92 % of the L2's peak
# beside 86-90 % of DRAM's, so an H200's L2 may stop a read-only stream short of its copy rate.)
#   MOE_FP8_COMMIT=<sha> [NCU_TOKENS="1 256"] bash benchmarks/device_read_ceiling.sh
# Prints: copy and read-only rates at several sizes; the masked GEMMs streaming weights for one
# row per expert (the purest weight stream the layer runs); the decode record with both floors;
# with NCU_TOKENS, ncu of the decode GEMMs (DRAM and L2 throughput, clocks) at those counts.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUTDIR=${OUT:-/tmp/read_ceiling}; mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,clocks.max.mem --format=csv,noheader
# the bundled kernels compiled in parallel first (a fresh machine: the steps below would compile
# them one at a time)
timeout 150 python3 -m moe_fp8.gemm.precompile > "$OUTDIR/precompile.log" 2>&1 || echo "precompile rc=$?"
python3 - <<'PY'
import sys
sys.path.insert(0, "benchmarks")
import torch
import common
rows = []
for mib in (128, 512, 2048):
    n = mib << 20
    rows.append({"MiB": mib, "copy_GBs (read+write)": common.copy_bandwidth_gbs(n),
                 "read_only_GBs (sum)": common.read_bandwidth_gbs(n)})
print(common.markdown_table(rows))
PY
MOE_FP8_BENCH_FLUSH=clean timeout 120 python3 benchmarks/experiments/layout_rounds.py --configs auto \
  --rounds 3 \
  --case masked:32x1,4096,7168 --case masked:32x1,7168,2048 2>&1 | grep -aE "^\||Error"
MOE_FP8_BENCH_FLUSH=clean timeout 200 python3 benchmarks/bench_layer.py --decode-only --no-peers \
  --repeats 20 --decode-tokens "${DECODE_TOKENS:-1,128,256}" > "$OUTDIR/decode.log" 2>&1
grep -aE "^\||bandwidth" "$OUTDIR/decode.log" | cut -c1-220
if [ -n "${NCU_TOKENS:-}" ]; then
  OUT="$OUTDIR/ncu" timeout 240 bash benchmarks/ncu_decode.sh $NCU_TOKENS > "$OUTDIR/ncu.log" 2>&1
  grep -aE "^==|duration|DRAM|L2|clock|tensor pipe active, SM" "$OUTDIR/ncu.log" | cut -c1-220
  tar -czf "$OUTDIR/ncu.tgz" -C "$OUTDIR" ncu && rm -rf "$OUTDIR/ncu"
fi

#!/usr/bin/env bash
# One device call for GEMM mainloop experiments: A/B of kernel versions and ablations
# (gemm_ab.py, ab_variants.py) and one ncu profile. Run from a snapshot that holds the versions
# under .variants/ (head = the previous commit's include tree; see NOTES.md).
#   bash benchmarks/device_gemm_explore.sh "VARIANTS" "CONFIGS" "SHAPES" [NCU_SHAPE]
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUTDIR="${OUT:-/tmp/explore_out}"; mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUTDIR/ab_gpu.txt" 2>&1
args=(); for v in $1; do args+=(--variant "$v"); done
for c in $2; do args+=(--config "$c"); done
for s in $3; do args+=(--shape "$s"); done
timeout 300 python3 benchmarks/gemm_ab.py "${args[@]}" --rounds 3 --repeats 10 2>&1 | tee "$OUTDIR/ab.log" | grep -E "^\||#"
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv >> "$OUTDIR/ab_gpu.txt" 2>&1
if [ -n "${4:-}" ]; then
  IFS=, read -r m n k <<< "$4"
  timeout 150 bash benchmarks/ncu_gemm.sh "$m" "$n" "$k" > "$OUTDIR/ncu_summary.txt" 2>&1
  cat "$OUTDIR/ncu_summary.txt"
fi

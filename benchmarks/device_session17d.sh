#!/usr/bin/env bash
# Session 17, call 4 (~4 min): masked 128 x 256 tiles for full 128-row tiles.
#   1. GPU tests: masked record shapes (heuristic), uneven experts at 128 x 256, heuristics;
#   2. compute-sanitizer memcheck / racecheck of the 5-SM 128 x 256 masked test;
#   3. bench_grouped --only masked with 128x128c1d1 (the previous pick) pinned beside.
# Everything under $OUT/s17d.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s17d; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  -k "masked_targets or masked_uneven or masked_graph" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
NODE="tests/test_gemm_gpu.py::test_masked_uneven[200-150-GemmConfig(block_m=128, block_n=256, stages=0, group_n=16, num_sms=5, double_buffer=True, cluster_m=1, cluster_n=1, a_row_chunk=0, split_k=1, early_b=False, swap_ab=False)]"
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q \
    -p no:cacheprovider -m gpu "$NODE" \
    > "$RAW/sanitize_$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$RAW/sanitize_$tool.log" | tail -n 2 | tr '\n' ' ')"
done
OUT="$RAW" timeout 200 python3 benchmarks/bench_grouped.py --only masked \
  --masked-configs 128x128c1d1 > "$RAW/grouped.log" 2>&1
echo "grouped rc=$?"; grep -aE "^\| (record|decode)" "$RAW"/grouped_masked_*.md | cut -c1-200
tar czf "$FINAL/s17d.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 22, call 1: the uneven weight-gradient rows under ncu (fp32 overwrite and bf16 out), the
# masked table with the record rows' kernel time, and on an H200 the decode record.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
RAW=${OUT:-/tmp/s22}; mkdir -p "$RAW"
gpu=$(nvidia-smi --query-gpu=name,power.limit --format=csv,noheader); echo "$gpu"
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
M=gpu__time_duration.sum,dram__bytes_write.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,gpc__cycles_elapsed.avg.per_second,lts__t_sectors_srcunit_tex_op_write.sum,lts__t_sectors_srcunit_tex_op_read.sum
for mode in fp32= bf16; do
  timeout 100 ncu --kernel-name regex:k_grouped --launch-skip 1 --launch-count 1 --metrics $M \
    python3 benchmarks/experiments/wgrad_uneven_once.py --mode $mode > "$RAW/ncu_$mode.log" 2>&1
  echo "== ncu $mode rc=$?"; grep -aE "^ +[a-z_]+__|tokens" "$RAW/ncu_$mode.log" | sed 's/  */ /g'
done
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py -k bf16 \
  > "$RAW/tests.log" 2>&1
echo "== tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
timeout 200 python3 benchmarks/experiments/wgrad_width_probe.py --bf16 --uneven --rounds 3 \
  --configs 128x256c2d1,128x256c1d1 > "$RAW/width.log" 2>&1
echo "== width rc=$?"; grep -aE "^\| (record|GEMM1|32)" "$RAW/width.log" | cut -c1-200
case "$gpu" in *H200*)
  MOE_FP8_BENCH_FLUSH=clean timeout 200 python3 benchmarks/bench_layer.py --decode-only \
    --no-peers --repeats 20 > "$RAW/decode.log" 2>&1
  echo "== decode rc=$?"; grep -aE "^\{" "$RAW/decode.log" | cut -c1-150 ;;
esac
timeout 170 python3 benchmarks/bench_grouped.py --only masked > "$RAW/masked.log" 2>&1
echo "== masked rc=$?"; grep -aE "^\| (record|decode|case)" "$RAW/masked.log" | cut -c1-250

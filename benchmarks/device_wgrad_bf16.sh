#!/usr/bin/env bash
# Session 21 (~6 min): the k-grouped weight-gradient GEMM with bf16 output (bf16 master weights).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_wgrad_bf16.sh
#   1. GPU tests: test_wgrad_gpu.py, the autograd bf16-master / overwrite / DeepSeek-shape tests;
#   2. compute-sanitizer memcheck + racecheck + synccheck of the bf16-output tests;
#   3. bench_wgrad (ours fp32 accumulate / overwrite / bf16 out / fp32 then .to(bf16), peers, in
#      turns); 4. bench_train (fp32 and bf16 masters vs the bf16 layer);
#   5. gemm_ab on 4096 x 2112 x 7168 (issue 3's nearest row): 128 x 192 with and without B multicast.
# Everything under $OUT/wgrad_bf16.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/wgrad_bf16; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
  tests/test_autograd.py -k "wgrad or bf16_masters or overwrite or deepseek" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
for tool in memcheck racecheck synccheck; do
  timeout 100 compute-sanitizer --tool $tool --kernel-name kns=moe_fp8 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_gpu.py \
    -k "test_wgrad_bf16_out and (auto or 128x192)" > "$RAW/san_$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE "ERROR SUMMARY|RACECHECK SUMMARY" "$RAW/san_$tool.log" | tail -n 1)"
done
OUT="$RAW" timeout 200 python3 benchmarks/bench_wgrad.py > "$RAW/wgrad.log" 2>&1
echo "bench_wgrad rc=$?"
python3 - "$RAW" <<'PY'
import csv, glob, sys
for path in glob.glob(sys.argv[1] + "/wgrad_2*.csv"):
    for r in csv.DictReader(open(path)):
        f = lambda k: float(r[k]) if r.get(k) not in (None, "", "nan") else float("nan")
        print(f"{r['case'][:24]:24s} {r['M']:>5}x{r['N']:<5} acc {f('us'):7.0f} ovw {f('overwrite_us'):7.0f} "
              f"bf16 {f('bf16_out_us'):7.0f} ({r['bf16_out_config']}) via-fp32 {f('via_fp32_us'):7.0f} "
              f"bf16 diff {f('bf16_out_diff_vs_ref'):.1e} vs bf16 peers {f('bf16_out_vs_bf16_peers'):.2f}")
PY
OUT="$RAW" timeout 240 python3 benchmarks/bench_train.py --no-profile > "$RAW/train.log" 2>&1
echo "bench_train rc=$?"; grep -aE "^\|" "$RAW/train.log" | grep -v "^|--" | cut -c1-150
timeout 90 python3 benchmarks/gemm_ab.py --variant head=moe_fp8/gemm/include --rounds 5 \
  --config 128x192s4c1d1 --config 128x192s4c2d1 --shape 4096,2112,7168 > "$RAW/gemm_ab_2112.log" 2>&1
echo "gemm_ab rc=$?"; grep -aE "^\| 4096" "$RAW/gemm_ab_2112.log" | cut -c1-120
tar czf "$FINAL/wgrad_bf16.tgz" -C "$RAW" . 2>/dev/null

#!/usr/bin/env bash
# Session 16, call 6 (~5 min): MOE_FP8_SWAP_AB_DOWN's default (64-row token tiles) in the layer.
#   1. GPU tests of swap AB (GEMM and the decode runner's bits);
#   2. decode_build_ab.py: the default (A) vs MOE_FP8_SWAP_AB_DOWN=0 (B), 1-256 tokens, 3 rounds;
#   3. the decode record list (bench_layer --decode-only --no-peers) at the defaults;
#   4. the prefill record (bench_layer --prefill-only, 3 interleaved rounds) under with_clocks;
#   5. compute-sanitizer racecheck of the smallest swap-AB GEMM test.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/s16e; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$RAW/precompile.log" 2>&1 || echo "precompile failed"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  tests/test_layer_gpu.py -k "swap_ab" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
OUT="$RAW" timeout 200 python3 benchmarks/decode_build_ab.py --tokens 1,8,32,64,128,256 \
  --b-env MOE_FP8_SWAP_AB_DOWN=0 > "$RAW/swap_ab.log" 2>&1
echo "default (A) vs MOE_FP8_SWAP_AB_DOWN=0 (B) rc=$?"; grep -a "^{" "$RAW/swap_ab.log" | cut -c1-300
OUT="$RAW" timeout 120 python3 benchmarks/bench_layer.py --decode-only --no-peers > "$RAW/decode.log" 2>&1
echo "decode record rc=$?"; grep -aE "^\| [0-9]|geomean" "$RAW/decode.log" | sort -u | cut -c1-80
OUT="$RAW" timeout 150 bash benchmarks/with_clocks.sh python3 benchmarks/bench_layer.py --prefill-only \
  --rounds 3 > "$RAW/prefill.log" 2>&1
echo "prefill record rc=$?"; grep -aE "^\| [0-9]|geomean|clocks:" "$RAW/prefill.log" | sort -u | cut -c1-150
timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q \
  -p no:cacheprovider -m gpu tests/test_gemm_gpu.py -k "test_masked_swap_ab and m64_r8_sm3" \
  > "$RAW/racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -aE "RACECHECK SUMMARY|passed|failed" "$RAW/racecheck.log" | tail -n 2 | tr '\n' ' ')"
tar czf "$FINAL/s16e.tgz" -C "$RAW" . 2>/dev/null

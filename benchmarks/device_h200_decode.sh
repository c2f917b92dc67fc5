#!/usr/bin/env bash
# The first GPU call when an H200 comes (~2 min; runs on an H100 too): the decode switches built
# for the H200's 256-token row (1.41x its floor, session 23), measured so far on H100s only.
#   MOE_FP8_COMMIT=<sha> [STEPS="..."] bash benchmarks/device_h200_decode.sh
# Steps (default: all but spreaddeep and probe, swap-AB first), each under a time limit, its rows
# printed as it ends:
#   deep        decode_build_ab: defaults vs MOE_FP8_SWIGLU_DEEP_RING=1 (4 / 5 stages), 1-256 tokens
#   spread      defaults vs MOE_FP8_MASKED_SPREAD=0 (64-row tiles at 256 tokens)
#   spreaddeep  both of the above against the deep ring alone
#   swapab      defaults (swap-AB down on since session 24) vs MOE_FP8_SWAP_AB_DOWN=0
#   swappair    swap_ab_pair: the unfused gate-up and the down GEMM, 128-row tiles vs swap AB
#               (at 256 tokens: do the 128-row MMAs bound the H200's decode GEMMs?)
#   swaptest    GPU tests of the swap-AB fused SwiGLU (kernel bytes, gather, layer bits)
#   sanitize    compute-sanitizer memcheck and racecheck of GEMM tests (SAN_K: their pytest -k;
#               default the swap-AB SwiGLU's)
#   swap96      GPU tests of the swap-AB down GEMM's 96-token tiles, then defaults vs
#               MOE_FP8_SWAP_AB_96=1 (7 ring stages instead of 5 at 256 tokens)
#   swapglu     defaults vs MOE_FP8_SWAP_AB_SWIGLU=1 (the fused gate-up as its swap-AB twin)
#   probe       layout_rounds: the masked down GEMM's tiles on 32 experts x 64 / 80 rows
#   l2tiles     layout_rounds: the masked down GEMM at 32 / 64 / 128 rows per expert on 256 / 128 /
#               64-wide tiles (do wider weight tiles per A row gain where the L2 carries more?)
#   decode      the decode record (clean flush) with the 256-token runner's replays
#   decodeenv   the same with DECODE_ENVS="VAR=1,VAR=1" set (a candidate default's record;
#               default: the deep ring and the 96-token swap-AB tiles)
#   timeline    profile_layer: the decode graph's kernels and replay timeline at 1 and 256 tokens
#               (TIMELINE_TOKENS="1 128 256": other counts)
#   ncu         ncu_decode.sh: full profiles of the decode GEMMs at 128 and 256 tokens (is the
#               256-token gate-up MMA-bound, ring-bound or DRAM-bound?); NCU_ENVS="VAR=1" adds a run
# Logs and result files in $OUT/logs.tgz.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; L=/tmp/h200_decode; mkdir -p "$FINAL" "$L"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
python3 -m moe_fp8.gemm.precompile > "$L/precompile.log" 2>&1 || echo "precompile failed"
step() {  # step NAME LIMIT CMD...: log to $L/NAME.log (result files under $L/NAME/)
  local name=$1 limit=$2; shift 2; mkdir -p "$L/$name"
  OUT="$L/$name" timeout --kill-after=5 "$limit" "$@" > "$L/$name.log" 2>&1
  echo "== $name rc=$?"
  grep -aE "^\||^\{| passed| failed|^FAILED|Error" "$L/$name.log" | grep -v "^|--" |
    cut -c1-200 | tail -n 14
  tar -czf "$FINAL/logs.tgz" -C "$L" .
}
ab="python3 benchmarks/decode_build_ab.py"  # a command, not a function: `timeout` runs it
for s in ${STEPS:-swaptest swapglu deep swappair swapab decode spread}; do
  case $s in
    deep) step deep 200 $ab --tokens 1,8,128,256 --b-env MOE_FP8_SWIGLU_DEEP_RING=1 ;;
    spread) step spread 150 $ab --tokens 128,256 --b-env MOE_FP8_MASKED_SPREAD=0 ;;
    spreaddeep) step spreaddeep 150 $ab --tokens 256 --a-env MOE_FP8_SWIGLU_DEEP_RING=1 \
                  --b-env MOE_FP8_MASKED_SPREAD=0,MOE_FP8_SWIGLU_DEEP_RING=1 ;;
    swapab) step swapab 150 $ab --tokens 1,128,256 --b-env MOE_FP8_SWAP_AB_DOWN=0 ;;
    swappair) step swappair 240 python3 benchmarks/swap_ab_pair.py --rounds 3 ;;
    swaptest) step swaptest 200 python3 -m pytest -q -x -m gpu tests/test_gemm_gpu.py \
                tests/test_layer_gpu.py -k "swap_ab_swiglu or (swiglu and swap)" ;;
    sanitize) for tool in memcheck racecheck; do
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "san_$tool" 200 compute-sanitizer \
                  --tool "$tool" --kernel-name kns=moe_fp8 --report-api-errors no --print-limit 20 \
                  python3 -m pytest -q -m gpu tests/test_gemm_gpu.py -k "${SAN_K:-test_masked_swiglu and swap}"
                grep -aE "ERROR SUMMARY|RACECHECK SUMMARY" "$L/san_$tool.log" | tail -n 2
              done ;;
    swap96) step swap96test 200 python3 -m pytest -q -x -m gpu tests/test_gemm_gpu.py \
              tests/test_layer_gpu.py -k "m96 or swap_ab_96"
            step swap96 200 $ab --tokens 128,256 --b-env MOE_FP8_SWAP_AB_96=1 ;;
    swapglu) step swapglu 200 $ab --tokens 1,8,128,256 --b-env MOE_FP8_SWAP_AB_SWIGLU=1 ;;
    probe) step probe 150 python3 benchmarks/experiments/layout_rounds.py \
             --configs auto,64x128s8c1d1r16,128x128s5c1d1r32,128x256s3c1d0r32 \
             --case masked:32x64,7168,2048 --case masked:32x80,7168,2048 --rounds 3 ;;
    l2tiles) step l2tiles 200 python3 benchmarks/experiments/layout_rounds.py \
               --configs 128x256c1d0r32,128x128c1d1r32,128x64c1d1r32 --case masked:32x32,7168,2048 \
               --case masked:32x64,7168,2048 --case masked:32x128,7168,2048 --rounds 3 ;;
    timeline) for n in ${TIMELINE_TOKENS:-1 256}; do
                step "timeline$n" 120 python3 benchmarks/profile_layer.py --tokens --decode "$n" \
                  --mode fused
              done ;;
    ncu) OUT="$L/ncu" timeout 300 bash benchmarks/ncu_decode.sh 128 256 > "$L/ncu.log" 2>&1
         [ -n "${NCU_ENVS:-}" ] && OUT="$L/ncu" ENVS="$NCU_ENVS" timeout 200 \
           bash benchmarks/ncu_decode.sh 256 >> "$L/ncu.log" 2>&1
         echo "== ncu"; head -c 6000 "$L/ncu.log"; tar -czf "$FINAL/logs.tgz" -C "$L" . ;;
    decode) MOE_FP8_BENCH_FLUSH=clean step decode 200 python3 benchmarks/bench_layer.py \
              --decode-only --no-peers --repeats 20 ;;
    decodeenv) (E=${DECODE_ENVS:-MOE_FP8_SWIGLU_DEEP_RING=1,MOE_FP8_SWAP_AB_96=1}; export ${E//,/ }
                echo "== decodeenv with $E"
                MOE_FP8_BENCH_FLUSH=clean step decodeenv 200 python3 benchmarks/bench_layer.py \
                  --decode-only --no-peers --repeats 20) ;;
    *) echo "unknown step $s" ;;
  esac
done

#!/usr/bin/env bash
# Environment switches A/B'd in one device call: for each switch of SWITCHES, the layer's decode
# rows (bench_layer --decode-only, the full 1-256 list and the big-runner row) with it 0, then 1;
# GROUPED_SWITCHES also get the masked grouped rows (bench_grouped --only masked) 0, then 1.
# An entry "A+B" of SWITCHES A/B's the set: A=0 B=0, then A=1 B=1. DECODE_TOKENS (e.g. 1,8,32):
# only those decode rows (and the big-runner row); the bf16 peer is not timed in these calls.
# TESTS: a pytest -k over the GEMM, permute, layer, route-dispatch and router GPU tests, run
# first with every switch of SWITCHES set to 1 (empty: no tests). Prints the tables; logs under
# $OUT/switch_ab.
#   cd .snap && SWITCHES="MOE_FP8_SMALL_DISPATCH MOE_FP8_FUSED_SWIGLU" \
#     GROUPED_SWITCHES="MOE_FP8_MASKED_ROW_CHUNKS" TESTS="masked or decode or permute" \
#     bash benchmarks/device_switch_ab.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL="${OUT:-/tmp/moe_fp8_out}/switch_ab"; mkdir -p "$FINAL"
# An entry A+B+C of SWITCHES is one set: all of its switches 0, then all 1. NAME:V sets V
# instead of 1 (a count, e.g. MOE_FP8_DECODE_ROUTER_SMS:48).
assign() {
  local out=() name value; IFS=+ read -ra names <<< "$1"
  for name in "${names[@]}"; do
    value=$2; [ "$2" = 1 ] && [ "${name#*:}" != "$name" ] && value=${name#*:}
    out+=("${name%%:*}=$value")
  done
  echo "${out[@]}"
}
all_on=(); for s in ${SWITCHES:-} ${GROUPED_SWITCHES:-}; do all_on+=($(assign "$s" 1)); done
if [ -n "${TESTS:-}" ]; then
  env "${all_on[@]}" timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gemm_gpu.py tests/test_permute_gpu.py tests/test_layer_gpu.py \
    tests/test_router_gpu.py -k "$TESTS" \
    > "$FINAL/tests.log" 2>&1
  echo "tests (all switches on) rc=$? $(tail -n 1 "$FINAL/tests.log" | cut -c1-100)"
  grep -aE "^FAILED" "$FINAL/tests.log" | head -n 8
fi
table() { grep -aE "^\|" "$1" | grep -v "^|--" | grep -vE "^\| (case|tokens) " | cut -c1-120 | tail -n "$2"; }
for s in ${SWITCHES:-} ${GROUPED_SWITCHES:-}; do
  for v in 0 1; do
    mkdir -p "$FINAL/$s-$v"
    OUT="$FINAL/$s-$v" timeout 150 env $(assign "$s" "$v") python3 benchmarks/bench_layer.py \
      --decode-only --repeats 5 --no-peers ${DECODE_TOKENS:+--decode-tokens "$DECODE_TOKENS"} \
      > "$FINAL/$s-$v/layer.log" 2>&1
    echo "== $s=$v layer decode rc=$?"; table "$FINAL/$s-$v/layer.log" 10
  done
done
for s in ${GROUPED_SWITCHES:-}; do
  for v in 0 1; do
    OUT="$FINAL/$s-$v" timeout 120 env $(assign "$s" "$v") python3 benchmarks/bench_grouped.py --only masked \
      --repeats 10 > "$FINAL/$s-$v/grouped.log" 2>&1
    echo "== $s=$v grouped masked rc=$?"; table "$FINAL/$s-$v/grouped.log" 16
  done
done

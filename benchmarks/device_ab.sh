#!/usr/bin/env bash
# A/B of two whole checkouts in one device call, same card, interleaved (old, new, old, new):
# the layer's decode rows and the masked grouped rows, which gemm_ab.py (dense, include trees
# only) cannot compare. Run from the new checkout:
#   cd .snap && OLD=../.snap_old bash benchmarks/device_ab.sh
# AB_BENCHES: subset of "layer grouped" (default both); AB_ROUNDS: rounds of the pair (default 2);
# AB_LAYER_ARGS: bench_layer's arguments (default: the quick decode rows).
# Logs: $OUT/ab/<bench>-<old|new>-<round>.log
set -uo pipefail
NEW="$PWD"; OLD="$(cd "${OLD:?set OLD to the old checkout}" && pwd)"
FINAL="${OUT:-/tmp/moe_fp8_out}/ab"; mkdir -p "$FINAL"
export PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
one() {  # one TREE NAME ROUND CMD...: run CMD inside TREE, print the table rows
  local tree=$1 name=$2 round=$3; shift 3
  local log="$FINAL/$name-$round.log"
  (cd "$tree" && PYTHONPATH="$tree" OUT="$FINAL" timeout 150 "$@" > "$log" 2>&1)
  echo "== $name round $round rc=$?"
  grep -aE "^\|" "$log" | grep -v "^|--" | grep -vE "^\| (case|tokens) " | cut -c1-150 | tail -n 16
}
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for side in old new; do
    tree=$OLD; [ "$side" = new ] && tree=$NEW
    [[ " ${AB_BENCHES:-layer grouped} " == *" layer "* ]] && \
      one "$tree" "layer-$side" "$round" python3 benchmarks/bench_layer.py ${AB_LAYER_ARGS:---quick --decode-only --repeats 5}
    [[ " ${AB_BENCHES:-layer grouped} " == *" grouped "* ]] && \
      one "$tree" "grouped-$side" "$round" python3 benchmarks/bench_grouped.py --only masked --repeats 10
  done
done

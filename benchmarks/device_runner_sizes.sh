#!/usr/bin/env bash
# The graph runner at prefill-sized batches: which layout and which decode-tuned switch costs it
# time there (session 31: the masked runner 1.08-1.29x the eager contiguous layer at 1024-2048
# tokens; session 33: buckets past 64 rows per expert capture the contiguous layout, and
# MOE_FP8_RUNNER_MASKED=1 brings the masked one back). For each
# switch of SWITCHES, decode_build_ab.py at TOKENS with the default (A) against the switch at 0
# (B; an entry NAME=V sets V instead, NAME=V,OTHER=W both), the eager layer timed in the same
# rounds; first (PROFILE=1) profile_layer.py's kernel tables for the eager forward and a replay
# at PROFILE_TOKENS. Logs under $OUT/runner_sizes.
#   [TOKENS=512,1024,2048] [SWITCHES="MOE_FP8_SWAP_AB_DOWN ..."] bash benchmarks/device_runner_sizes.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL="${OUT:-/tmp/moe_fp8_out}/runner_sizes"; mkdir -p "$FINAL"
TOKENS=${TOKENS:-512,1024,2048}
SWITCHES=${SWITCHES:-MOE_FP8_RUNNER_MASKED=1 MOE_FP8_RUNNER_MASKED=1,MOE_FP8_DECODE_GATHER=1,MOE_FP8_SWAP_AB_DOWN=1}
if [ "${PROFILE:-1}" = 1 ]; then
  timeout 150 python3 benchmarks/profile_layer.py --tokens "${PROFILE_TOKENS:-1024}" \
    --decode "${PROFILE_TOKENS:-1024}" --mode fused --top 14 > "$FINAL/profile.log" 2>&1
  echo "profile rc=$?"
fi
for s in $SWITCHES; do
  b=$s; [ "${s#*=}" = "$s" ] && b="$s=0"
  timeout 120 python3 benchmarks/decode_build_ab.py --tokens "$TOKENS" --rounds 3 --repeats 10 \
    --b-env "$b" --max-diff 1e-3 --eager > "$FINAL/$s.log" 2>&1
  echo "B: $b rc=$?"
  grep -a "tokens" "$FINAL/$s.log" | python3 -c '
import ast, sys
for line in sys.stdin:
    try:
        r = ast.literal_eval(line[line.index("{"):])
    except (ValueError, SyntaxError):
        continue
    r.setdefault("eager_us", float("nan"))
    print("  %(tokens)5d tokens: default %(A_us)8.1f  B %(B_us)8.1f  eager %(eager_us)8.1f  "
          "B-A %(B_minus_A_us)+7.1f us  diff %(diff).1e  (%(A_rounds)s | %(B_rounds)s)" % r)'
done

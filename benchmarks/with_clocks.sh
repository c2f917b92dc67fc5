#!/usr/bin/env bash
# Run a command while nvidia-smi samples the SM clock, power and clock-event reasons every 100 ms;
# print one summary line after it (the H100s lent here run compute-bound GEMMs at their 700 W
# software power cap: SM clock median 1.35-1.5 GHz of 1.98, session 14). The samples go to
# $CLOCKS_CSV (default $OUT/clocks_<seconds>.csv).
#   bash benchmarks/with_clocks.sh python3 benchmarks/bench_gemm.py
set -uo pipefail
csv=${CLOCKS_CSV:-${OUT:-/tmp}/clocks_$SECONDS.csv}
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active \
  --format=csv,noheader -lms 100 > "$csv" 2>&1 &
logger=$!
"$@"; rc=$?
kill "$logger" 2>/dev/null; wait "$logger" 2>/dev/null
python3 "$(dirname "$0")/clock_summary.py" "$csv"
exit $rc

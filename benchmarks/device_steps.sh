# Shared by the device scripts (source it after setting STEPS, DEVICE_BUDGET_S and OUTDIR):
#   want NAME            true when NAME is one of $STEPS
#   cap LIMIT            LIMIT seconds, or what is left of the budget if less
#   step NAME LIMIT CMD  CMD under that limit, logged to $OUTDIR/NAME.log; prints one status line,
#                        the FAILED/ERROR lines and the log's table rows
STEPS=" ${STEPS} "
budget=${DEVICE_BUDGET_S:-560}
want() { [[ "$STEPS" == *" $1 "* ]]; }
cap() { local l=$((budget - SECONDS)); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
step() {
  local name=$1 limit; limit=$(cap "$2"); shift 2; local t0=$SECONDS
  if [ "$limit" -lt 15 ]; then echo "$name skipped (budget)"; return; fi
  timeout --kill-after=5 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s: $(grep -aE 'passed|failed|rror|SUMMARY' "$OUTDIR/$name.log" | tail -n 1 | cut -c1-120)"
  grep -aE "^(FAILED|ERROR)" "$OUTDIR/$name.log" | cut -c1-220 | head -n 12
  grep -aE "^\||; " "$OUTDIR/$name.log" | grep -v "^|--" | cut -c1-230 | tail -n 16
}

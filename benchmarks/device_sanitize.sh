#!/usr/bin/env bash
# compute-sanitizer over every kernel family on small shapes, one device call, < 5 minutes.
#
#   0. baseline: `python3 tests/fuzz_gpu.py --once all` without a sanitizer: compiles every kernel
#      the driver needs (warm JIT cache for the runs below) and checks each call against its
#      reference (families: quant_token quant_block silu_contiguous silu_masked train_block_t
#      train_token_t train_requant silu_backward router permute_index
#      permute_rows (incl. the small dispatch) permute_combine ep_send gemm_dense (incl. split K) gemm_contiguous gemm_offsets
#      gemm_masked gemm_swiglu (the fused SwiGLU GEMM) gemm_kgrouped; the
#      permute family is the layer's fused path vs its torch path).
#   1. side by side on the one GPU: memcheck, racecheck and synccheck of the same driver, plus
#      memcheck of `--once guards` (out-of-contract masked_m / m_indices / offsets with the debug
#      checks off: the kernels must still stay inside their tensors). Only moe_fp8 kernels are
#      instrumented (--kernel-name kns=moe_fp8); memcheck runs with torch's caching allocator off
#      so an overrun into a neighbouring tensor is a separate allocation, i.e. visible. And
#      racecheck of the GEMM tests whose CTAs walk many tiles (step "reuse").
#   2. findings per tool per family (the driver prints FAMILY begin/end markers; a finding is
#      attributed to the family running when it was reported), last a short table.
#
# Exit status: 0 clean; 1 any finding or a failed reference check; 2 a sanitizer could not run
# (e.g. "Device not supported" on gVisor machines: KINDS.md).
# Usage (repo root, GPU machine): MOE_FP8_COMMIT=<sha> bash benchmarks/device_sanitize.sh
# Files back under $OUT: summary.txt, findings.md, logs.tgz.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
FINAL="${OUT:-/tmp/moe_fp8_sanitize_out}"
RAW="$FINAL/raw"; mkdir -p "$RAW"
export MOE_FP8_CACHE_DIR="${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}"
FILTER="kns=moe_fp8"  # only moe_fp8 kernels are instrumented (torch's run at full speed)
SAN="compute-sanitizer --kernel-name $FILTER --report-api-errors no --print-limit 100"
summary="$FINAL/summary.txt"; : > "$summary"

step() {  # step NAME TIMEOUT_S CMD...: log to $RAW/NAME.log, one summary line
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$RAW/$name.log" 2>&1; local rc=$?
  printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -aE 'SUMMARY|^once ' "$RAW/$name.log" | tail -n 1 | cut -c1-110)" >> "$summary"
  echo "$rc" > "$RAW/$name.rc"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$RAW/gpu.txt" 2>&1
compute-sanitizer --version > "$RAW/sanitizer_version.txt" 2>&1
step baseline 100 python3 tests/fuzz_gpu.py --once all
step memcheck 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool memcheck python3 tests/fuzz_gpu.py --once all &
step racecheck 180 $SAN --tool racecheck python3 tests/fuzz_gpu.py --once all &
step synccheck 180 $SAN --tool synccheck python3 tests/fuzz_gpu.py --once all &
step guards 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool memcheck python3 tests/fuzz_gpu.py --once guards &
# the fuzz driver's GEMMs run the heuristic's full grid (a tile or two per CTA): racecheck the
# pinned few-SM configs too, where CTAs reuse the tile-scale and epilogue buffers (session 7)
step reuse 180 $SAN --tool racecheck python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_gemm_gpu.py -k "p7 or zero_padding or num_sms" &
# the decode-step kernels of session 11 (small dispatch, stage): memcheck of their
# GPU tests, with torch's caching allocator (its tests capture decode graphs, and a capture may
# not cudaMalloc: PYTORCH_NO_CUDA_MEMORY_CACHING=1 failed them, H200 2026-12-05)
step decode 180 $SAN --tool memcheck python3 -m pytest -q \
  -p no:cacheprovider -m gpu tests/test_permute_gpu.py tests/test_layer_gpu.py \
  -k "small or stage or gather" &
wait

python3 - "$RAW" "$FINAL/findings.md" <<'PY' > "$RAW/report.txt"
"""Findings per tool per family from the sanitizer logs; exit 0 clean, 1 findings, 2 unavailable."""
import re, sys
from pathlib import Path
raw, out = Path(sys.argv[1]), Path(sys.argv[2])
# a reported problem starts one of these lines (memcheck / racecheck / synccheck / hardware)
finding = re.compile(r"^========= (Invalid |Error|Race |Barrier |Warning|Uninitialized|Misaligned|"
                     r"Out-of-range|Address |Malformed|Illegal|Hardware|Program hit)")
summary = re.compile(r"(ERROR SUMMARY: (\d+) error)|(RACECHECK SUMMARY: (\d+) hazard)")
families = ["quant_token", "quant_block", "silu_contiguous", "silu_masked", "train_block_t",
            "train_token_t", "train_requant", "silu_backward", "router", "permute_index",
            "permute_rows", "permute_combine", "ep_send", "gemm_dense", "gemm_contiguous", "gemm_offsets",
            "gemm_masked", "gemm_kgrouped"]
def read(name, default=""):
    path = raw / name
    return path.read_text(errors="replace").strip() if path.exists() else default
full, compact, notes, status = [], [], [], 0
baseline = read("baseline.rc", "?")
if baseline != "0":
    status = 1
    notes.append(f"baseline (no sanitizer) rc={baseline}: a reference check failed or the driver crashed")
for tool in ("memcheck", "racecheck", "synccheck", "guards", "reuse", "decode"):
    text, rc = read(f"{tool}.log"), read(f"{tool}.rc", "?")
    # pytest prints no FAMILY lines
    start = {"reuse": "gemm_tile_reuse", "decode": "decode_switches"}.get(tool, "outside")
    counts, family, examples = {}, start, []
    for line in text.splitlines():
        m = re.match(r"FAMILY (\S+) (begin|end)", line)
        if m:
            family = m.group(1) if m.group(2) == "begin" else start
        elif finding.match(line):
            counts[family] = counts.get(family, 0) + 1
            if len(examples) < 3:
                examples.append(f"{tool} [{family}] {line[10:].strip()[:140]}")
    totals = [int(g) for m in summary.finditer(text) for g in (m.group(2), m.group(4)) if g]
    if not (totals or "FAMILY" in text) or "not supported" in text.lower():
        status = max(status, 2)
        last = text.splitlines()[-1][:140] if text else "no output"
        notes.append(f"{tool}: the sanitizer did not run (rc={rc}): {last}")
        compact.append(f"| {tool} | unavailable | - | rc={rc} |")
        continue
    found = sum(counts.values())
    if rc != "0" or found or sum(totals):
        status = max(status, 1)
    names = {"guards": ["guards"], "reuse": ["gemm_tile_reuse"],
             "decode": ["decode_switches"]}.get(tool, families)
    for name in names + (["outside"] if counts.get("outside") else []):
        full.append(f"| {tool} | {name} | {counts.get(name, 0)} |")
    where = ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"
    note = {"0": "", "124": "TIMED OUT (hang?)"}.get(rc, f"driver rc={rc}")
    compact.append(f"| {tool} | {max(found, sum(totals))} | {where} | {note} |")
    notes += examples
head = ["| tool | findings | families with findings | note |", "| --- | ---: | --- | --- |"]
out.write_text("\n".join(["| tool | family | findings |", "| --- | --- | ---: |"] + full + [""]
                         + head + compact + [""] + notes) + "\n")
print("\n".join(notes + head + compact))
sys.exit(status)
PY
status=$?
cp "$RAW/report.txt" "$FINAL/report.txt" 2>/dev/null
{ cat "$RAW/gpu.txt"; grep -m1 -i "version" "$RAW/sanitizer_version.txt"; } >> "$summary" 2>/dev/null
tar czf "$FINAL/logs.tgz" -C "$RAW" . && rm -rf "$RAW"
cat "$summary"
echo "--- exit $status (0 clean, 1 findings or failed checks, 2 a sanitizer could not run)"
cat "$FINAL/report.txt"
exit "$status"

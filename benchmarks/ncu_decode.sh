#!/usr/bin/env bash
# Where a decode step's GEMM spends its time: one ncu "full" profile (warp-stall sampling per SASS
# instruction) of the kernels matching KERNEL in one graph replay of the layer's decode runner
# (DeepSeek-V3 shapes, 32 experts), per token count; text pages under $OUT (no ncu on the CPU
# machines).
#   [KERNEL=regex] [ENVS="VAR=1 ..."] bash benchmarks/ncu_decode.sh 128 256
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUTDIR="${OUT:-/tmp/ncu_out}"; mkdir -p "$OUTDIR"
cat > /tmp/ncu_decode.py <<'PY'
import sys, torch
from moe_fp8.layers import MoE, MoEConfig
n = int(sys.argv[1])
cfg = MoEConfig.deepseek_v3(num_experts=32)
moe = MoE(cfg, device="cuda", seed=0)
x = torch.randn(n, cfg.hidden_size, device="cuda",
                generator=torch.Generator(device="cuda").manual_seed(1000 + n)).bfloat16()
run = moe.decode_runner(max_tokens=n)
for _ in range(3):  # capture, compile and warm outside the profiled range
    run(x)
torch.cuda.synchronize()
torch.cuda.profiler.start()
run(x)
torch.cuda.synchronize()
torch.cuda.profiler.stop()
PY
for n in "$@"; do
  tag="ncu_decode${n}${ENVS:+_$(echo "$ENVS" | tr ' =' '_-')}"
  env ${ENVS:-} ncu --set full --import-source no --clock-control none --profile-from-start off \
    --kernel-name "regex:${KERNEL:-fused_swiglu|fp8_gemm}" -f -o "/tmp/$tag" \
    python3 /tmp/ncu_decode.py "$n" > "$OUTDIR/$tag.log" 2>&1
  ncu -i "/tmp/$tag.ncu-rep" --page details > "$OUTDIR/$tag.details.txt" 2>&1
  ncu -i "/tmp/$tag.ncu-rep" --page raw --csv > "$OUTDIR/$tag.raw.csv" 2>&1
  echo "== $tag"
  python3 benchmarks/ncu_table.py "$OUTDIR/$tag.raw.csv"
done

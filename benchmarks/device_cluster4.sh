#!/usr/bin/env bash
# Session 21's experiment (~4 min): dense 2 x 2 clusters (A and B both multicast, 24 KB of L2
# reads per CTA and K block at 128 x 256 instead of 32 KB with B multicast alone).
#   MOE_FP8_COMMIT=<sha> bash benchmarks/device_cluster4.sh
#   1. GPU tests of the 2 x 2 instances (and the 2-CTA multicast tests beside them);
#   2. compute-sanitizer memcheck + racecheck + synccheck of one 2 x 2 test;
#   3. resident clusters of 2 and of 4 CTAs for the 128 x 256 instance;
#   4. gemm_ab (L2 flushed, interleaved rounds): 128x256 c2 (shipped) vs c2a2, four M = 4096 shapes;
#   5. power_probe (steady state at the power cap) on two of them.
# Everything under $OUT/cluster4.tgz; a short summary on stdout.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
FINAL=${OUT:-/tmp/moe_fp8_out}; RAW=/tmp/cluster4; mkdir -p "$FINAL" "$RAW"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
  -k "ab_multicast or a_multicast or dense_multicast or pinned_configs" > "$RAW/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$RAW/tests.log" | cut -c1-120)"
grep -aE "^FAILED|Error" "$RAW/tests.log" | head -n 10 | cut -c1-250
for tool in memcheck racecheck synccheck; do
  timeout 120 compute-sanitizer --tool $tool --kernel-name kns=moe_fp8 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemm_gpu.py \
    -k "test_dense_ab_multicast and 333" > "$RAW/san_$tool.log" 2>&1
  echo "$tool rc=$? $(grep -aE "ERROR SUMMARY|RACECHECK SUMMARY" "$RAW/san_$tool.log" | tail -n 1)"
done
timeout 60 python3 - <<'PY' 2>&1 | tee "$RAW/clusters.log"
import torch
import moe_fp8.gemm as G
from moe_fp8.gemm import heuristics as H
from moe_fp8.gemm.kernels import fp8_gemm as K
a = G.per_token_group_quant_fp8(torch.randn(512, 7168, device="cuda", dtype=torch.bfloat16))
b = G.per_block_quant_fp8(torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16))
for cm, cn in ((1, 1), (2, 1), (2, 2)):
    c = H.GemmConfig(128, 256, cluster_m=cm, cluster_n=cn).resolved(7168)
    G.fp8_gemm_nt(a, b, backend="kernel", config=c)
    kernel = K._get_kernel(4096, 7168, c, K.kLayoutDense, 0)
    smem = H.smem_bytes(128, 256, c.stages, 7168)
    print(f"128x256 cluster {cm}x{cn}: {K.max_active_clusters(kernel, c.cluster_size, c.num_threads, smem)} "
          f"resident clusters")
PY
timeout 200 python3 benchmarks/gemm_ab.py --variant head=moe_fp8/gemm/include --rounds 5 \
  --config 128x256c2d0 --config 128x256c2d0a2 --shape 4096,4096,7168 --shape 4096,7168,16384 \
  --shape 4096,7168,2048 --shape 4096,24576,1536 > "$RAW/gemm_ab.log" 2>&1
echo "gemm_ab rc=$?"; grep -aE "^\|" "$RAW/gemm_ab.log" | cut -c1-160
timeout 150 python3 benchmarks/power_probe.py --cases dense --seconds 2 --rounds 2 \
  --dense-shapes "4096,4096,7168;4096,7168,16384" --configs 128x256c2d0,128x256c2d0a2 \
  > "$RAW/power.log" 2>&1
echo "power_probe rc=$?"; grep -aE "^\|" "$RAW/power.log" | cut -c1-170
tar czf "$FINAL/cluster4.tgz" -C "$RAW" . 2>/dev/null

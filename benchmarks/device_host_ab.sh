#!/usr/bin/env bash
# Host time of the eager layer at small batches, and an A/B of two trees' launch paths (~6 min).
#   mkdir -p .ab/base && git archive <base sha> moe_fp8 | tar -x -C .ab/base   # untracked, travels
#   MOE_FP8_COMMIT=<sha> [STEPS="layer ab"] [RUNS=3] bash benchmarks/device_host_ab.sh
# Steps:
#   tests  the GPU tests of this session's changes (TESTS_K: their pytest -k)
#   (in this order: tests, ab, layer)
#   layer  bench_layer: the eager prefill at 256-4096 tokens beside the bf16 and row-wise FP8
#          layers, and the graph runner (masked layout) at 256-2048 tokens: where the eager layer
#          is host-bound, which is faster
#   ab     experiments/launch_overhead.py (ops, eager layer at 128 / 512 tokens, host us per
#          stage), the base tree (.ab/base) and this one in RUNS interleaved pairs of processes;
#          its control row (torch.mm) says which runs saw the same host speed; PIN="taskset -c 3"
#          keeps each process on one core
set -uo pipefail
export PYTHONUNBUFFERED=1 MOE_FP8_CACHE_DIR=${MOE_FP8_CACHE_DIR:-/tmp/moe_fp8_cache}
OUTDIR=${OUT:-/tmp/host_ab}; mkdir -p "$OUTDIR"
here=$PWD
steps=" ${STEPS:-tests layer ab} "
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
PYTHONPATH=$here timeout 200 python3 -m moe_fp8.gemm.precompile > "$OUTDIR/precompile.log" 2>&1 \
  || echo "precompile rc=$?"
if [[ "$steps" == *" tests "* ]]; then
  PYTHONPATH=$here timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layer_gpu.py \
    -k "${TESTS_K:-share_buffers or graph_decode_replays or batch_size_graphs}" > "$OUTDIR/tests.log" 2>&1
  tail -n 3 "$OUTDIR/tests.log"
fi
if [[ "$steps" == *" ab "* ]] && [ -d .ab/base/moe_fp8 ]; then
  for run in $(seq "${RUNS:-3}"); do
    for tree in base head; do
      root=$here; [ $tree = base ] && root=$here/.ab/base
      PYTHONPATH=$root timeout 100 ${PIN:-} python3 benchmarks/experiments/launch_overhead.py --calls 100 \
        --layer-tokens "${LAYER_TOKENS:-128,512}" > "$OUTDIR/ab_${tree}_$run.log" 2>&1
      echo "== run $run $tree"; grep -aE "^moe_fp8 from|^\| [0-9]|^\| (Kernel|per_token|fp8_gemm|m_grouped|torch.mm bf16 -> bf16|MoE)" "$OUTDIR/ab_${tree}_$run.log"
    done
  done
fi
if [[ "$steps" == *" layer "* ]]; then
  PYTHONPATH=$here timeout 240 python3 benchmarks/bench_layer.py --prefill-tokens "${PREFILL_TOKENS:-256,512,1024,2048,4096}" \
    --decode-tokens "${RUNNER_TOKENS:-256,512,1024,2048}" --rounds 3 --repeats 10 > "$OUTDIR/layer.log" 2>&1
  grep -aE "^\||geomean|Error" "$OUTDIR/layer.log" | cut -c1-240
  cp benchmarks/results/layer_*"$(date +%F)"* "$OUTDIR/" 2>/dev/null
fi

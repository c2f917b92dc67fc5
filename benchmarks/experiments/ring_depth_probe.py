"""Do the decode GEMMs wait on the weight bytes each SM keeps in flight? Asked on any card.

The H200's 256-token decode streams its routed GEMMs at ~3.2-3.5 TB/s of its ~4.3 (session 23);
the H100's run at ~85 % of their DRAM peak whatever the ring depth (ncu, session 26). One reading
(NOTES, session 26): an SM sustains (bytes in flight) / (loaded latency), so the H200's ~32 GB/s
per SM needs more bytes in flight than the H100's ~23. This probe tests that reading on either
card by raising the rate each SM must stream: the same decode GEMMs on a persistent grid capped
at fewer SMs (GemmConfig.num_sms), each at several ring depths. If depth bounds the stream, the
deeper rings gain on the capped grids (per-SM demand like the H200's) and not on the full one.

Cases (32 experts, rows per expert drawn as a decode batch's, the layer's kernels):
* gate-up: the fused SwiGLU GEMM with the decode gather (N 4096, K 7168), 128 x 256 tiles at
  256 tokens (3 stages today, 4 = MOE_FP8_SWIGLU_DEEP_RING), 64 x 256 at 128 tokens (4 / 5);
* down: the swap-AB GEMM with early weights (N 7168, K 2048), 128-token tiles at 256 tokens
  (5 stages today; 96-token tiles with 7 = MOE_FP8_SWAP_AB_96), 64-token tiles at 128 tokens (8).

Interleaved rounds per (GEMM, batch, SM cap), clean L2 flush, graph replays; the outputs of every
config are compared with the first's (the same bits expected: the K order does not change).

    python benchmarks/experiments/ring_depth_probe.py [--sms all,100,76] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
from bench_gemm import graph_replay  # noqa: E402
from bench_grouped import _act, _rand  # noqa: E402
from swap_ab_pair import _counts, kBatches  # noqa: E402  (the decode batches' row draws)

from moe_fp8.gemm import heuristics as H  # noqa: E402
from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402
from moe_fp8.gemm.precompile import precompile  # noqa: E402

kExperts, kMaxRows, kHidden, kInter, kTokens = 32, 128, 7168, 2048, 256
# (gemm, batch) -> configs, the first today's default
kConfigs = {
    ("gate-up", "256 tokens"): [(128, s) for s in (3, 2, 4)],
    ("gate-up", "128 tokens"): [(64, s) for s in (4, 3, 5)],
    ("down", "256 tokens"): [(128, 5), (128, 3), (128, 4), (96, 5), (96, 7)],
    ("down", "128 tokens"): [(64, 8), (64, 4), (64, 6)],
}


def _config(gemm: str, block_m: int, stages: int, sms: int) -> H.GemmConfig:
    chunk = H.kARowChunks[block_m]
    if gemm == "gate-up":
        return H.GemmConfig(block_m, 256, stages=stages, a_row_chunk=chunk,
                            num_sms=sms).resolved(kHidden, swiglu=True)
    return H.GemmConfig(block_m, 128, stages=stages, a_row_chunk=chunk, early_b=True,
                        swap_ab=True, num_sms=sms).resolved(kInter)


def _weight_bytes_per_stage(gemm: str) -> int:
    return (256 if gemm == "gate-up" else 128) * H.kBlockK  # B's rows per slot x one K block


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sms", default="all,100,76", help="persistent grid caps, 'all' = every SM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    card_sms = H.num_sms(torch.cuda.current_device())
    caps = [card_sms if c == "all" else int(c) for c in args.sms.split(",")]
    sources = []
    for (gemm, _), configs in kConfigs.items():
        for block_m, stages in configs:
            c = _config(gemm, block_m, stages, 0)
            sources.append(K.swiglu_source(2 * kInter, kHidden, c, False, gather=True)
                           if gemm == "gate-up" else
                           K.kernel_source(kHidden, kInter, c, K.kLayoutMasked))
    precompile(sources, verbose=False)

    gen = torch.Generator(device="cuda").manual_seed(5)
    w13, s13 = ref.per_block_quant(_rand((kExperts, 2 * kInter, kHidden), gen))
    w2, s2 = ref.per_block_quant(_rand((kExperts, kHidden, kInter), gen))
    w13, w2 = w13.contiguous(), w2.contiguous()
    x, _ = _act(_rand((kTokens, kHidden), gen))  # the unpermuted tokens the gather reads
    a, sa = _act(_rand((kExperts, kMaxRows, kHidden), gen))  # a: shape only; sa: the layout's
    row_token = torch.randint(0, kTokens, (kExperts, kMaxRows), generator=gen, device="cuda")
    h, hs = _act(_rand((kExperts, kMaxRows, kInter), gen))
    rows = []
    with common.flush_as("clean"):
        for (gemm, batch), configs in kConfigs.items():
            spec, expected_m = kBatches[batch]
            masked_m = _counts(spec, seed=expected_m)
            valid = ref.masked_row_mask(kMaxRows, masked_m)
            n, k = (2 * kInter, kHidden) if gemm == "gate-up" else (kHidden, kInter)
            weight_bytes = kExperts * n * k
            for cap in caps:
                runs = {}
                for block_m, stages in configs:
                    c = _config(gemm, block_m, stages, cap)
                    if gemm == "gate-up":
                        out = (torch.full((kExperts, kMaxRows, kInter), 0x7F, dtype=torch.uint8,
                                          device="cuda").view(torch.float8_e4m3fn),
                               empty_act_scales(kMaxRows, kInter // 128, kExperts, device="cuda"))
                        fn = (lambda c=c, out=out: K.m_grouped_masked_swiglu(
                            a, sa, w13, s13, masked_m, expected_m, out[0], out[1], config=c,
                            gather=(x, row_token)))
                        result = out[0]
                    else:
                        result = torch.full((kExperts, kMaxRows, kHidden), float("nan"),
                                            dtype=torch.bfloat16, device="cuda")
                        fn = (lambda c=c, out=result: K.m_grouped_masked(
                            h, hs, w2, s2, masked_m, expected_m, out, c))
                    runs[(block_m, stages)] = (graph_replay(fn), result, c)
                torch.cuda.synchronize()
                times = {key: [] for key in runs}
                for _ in range(args.rounds):
                    for key, (replay, _, _) in runs.items():
                        times[key].append(common.bench(replay, repeats=args.repeats))
                first_key = next(iter(runs))
                first, first_us = runs[first_key][1], statistics.median(times[first_key])
                for (block_m, stages), (_, result, c) in runs.items():
                    us = statistics.median(times[(block_m, stages)])
                    same = torch.equal(result[valid].view(torch.uint8), first[valid].view(torch.uint8))
                    row = {"gemm": gemm, "batch": batch, "sms": cap, "tile_rows": block_m,
                           "stages": c.stages,
                           "weight_KB_in_flight_per_SM": c.stages * _weight_bytes_per_stage(gemm) // 1024,
                           "us": us, "TB/s": weight_bytes / us / 1e6,
                           "GB/s_per_SM": weight_bytes / us / 1e3 / cap,
                           "vs_first": first_us / us,
                           "rounds_us": "/".join(f"{t:.1f}" for t in times[(block_m, stages)]),
                           "bits_vs_first": "same" if same else "DIFFER"}
                    rows.append(row)
                    common.print_row(row)
                del runs
                torch.cuda.empty_cache()
        common.write_results("ring_depth_probe", rows, (
            "32 experts, rows per expert drawn uniformly in the batch's range (swap_ab_pair.py's draws); weight bytes = "
            "every expert's N x K fp8; sms = the persistent grid's cap; vs_first = the first "
            "config's time / this one's within its (gemm, batch, sms) group (> 1: faster); clean "
            f"L2 flush, median of {args.rounds} interleaved rounds of {args.repeats} graph replays"))


if __name__ == "__main__":
    main()

"""Would the k-grouped weight-gradient GEMM gain from tiles wider than 128 x 128? Its promotion
multiplies per element (per-row and per-column scales), so a wider tile does not cut CUDA-core work
per FLOP, but it reads fewer L2 bytes per FLOP (each A row block serves more columns), which is
what TFLOPS follow at the H100's power cap. 128 x 192 / 160 fit single-buffered (96 accumulators
+ 96 partials); 128 x 256 does not (128 + 128 registers).

    python benchmarks/experiments/wgrad_width_probe.py [--rounds 5] [--configs 128x192s2c2d1,...]

Prints, per case of bench_wgrad.py's record rows, each config's median over interleaved rounds
(L2 flushed, graph replays, `accumulate=True`) and the round values.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
from bench_gemm import bench_graph  # noqa: E402
from bench_wgrad import _quant_tokens  # noqa: E402
from gemm_ab import parse_config  # noqa: E402

from moe_fp8.gemm.heuristics import GemmConfig, num_sms, wgrad_config  # noqa: E402
from moe_fp8.gemm.kernels import wgrad as W  # noqa: E402

kCases = [("record shape, 4 experts", 7168, 2048, 4), ("record shape, 8 experts", 7168, 2048, 8),
          ("GEMM1 weight, 4 experts", 4096, 7168, 4)]
kConfigs = {"128x192 c1": GemmConfig(128, 192), "128x192 c2": GemmConfig(128, 192, cluster_m=2),
            "128x160 c2": GemmConfig(128, 160, cluster_m=2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--configs", default="", help="instead of the width set: pinned configs "
                        "in gemm_ab.py's syntax, e.g. 128x192s2c2d1")
    args = parser.parse_args()
    pinned = ({text: parse_config(text) for text in args.configs.split(",") if text}
              if args.configs else kConfigs)
    rows = []
    for label, m, n, experts in kCases:
        tokens = 4096 * experts
        gen = torch.Generator(device="cuda").manual_seed(m + n)
        (qa, sa) = _quant_tokens(torch.randn(m, tokens, device="cuda", generator=gen).bfloat16())
        (qb, sb) = _quant_tokens(torch.randn(n, tokens, device="cuda", generator=gen).bfloat16())
        offsets = torch.arange(0, tokens + 1, 4096, dtype=torch.int32, device="cuda")
        out = torch.zeros(experts, m, n, device="cuda")
        configs = {"default": wgrad_config(m, n, num_sms(0)), **pinned}
        resolved = {name: c.resolved(0, wgrad=True) for name, c in configs.items()}
        times = {name: [] for name in resolved}
        for _ in range(args.rounds):
            for name, c in resolved.items():
                times[name].append(bench_graph(
                    lambda c=c: W.k_grouped_tn(qa, sa, qb, sb, offsets, out, c), args.repeats))
        flops = 2 * m * n * tokens
        for name, values in times.items():
            c = resolved[name]
            us = statistics.median(values)
            row = {"case": label, "config": f"{name} ({c.block_m}x{c.block_n}s{c.stages}c{c.cluster_m})",
                   "us": us, "TFLOPS": flops / us / 1e6,
                   "rounds_us": "/".join(f"{v:.0f}" for v in values)}
            rows.append(row)
            common.print_row(row)
        torch.cuda.empty_cache()
    common.write_results("wgrad_width_probe", rows, f"{args.rounds} interleaved rounds of "
                         f"{args.repeats} L2-flushed graph replays, medians")


if __name__ == "__main__":
    main()

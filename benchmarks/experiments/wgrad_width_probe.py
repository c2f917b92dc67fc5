"""Would the k-grouped weight-gradient GEMM gain from tiles wider than 128 x 128? Its promotion
multiplies per element (per-row and per-column scales), so a wider tile does not cut CUDA-core work
per FLOP, but it reads fewer L2 bytes per FLOP (each A row block serves more columns), which is
what TFLOPS follow at the H100's power cap. 128 x 192 / 160 fit single-buffered (96 accumulators
+ 96 partials); 128 x 256 runs as two 128-column halves into one partial set (128 + 64 registers),
and 3 stages fit beside its staging tile (fp32: staged 128 columns at a time).

    python benchmarks/experiments/wgrad_width_probe.py [--rounds 5] [--configs 128x192s2c2d1,...]
        [--bf16 | --overwrite] [--uneven]

Prints, per case of bench_wgrad.py's record rows (``--uneven``: also its 32-expert rows), each
config's median over interleaved rounds (L2 flushed, graph replays; fp32 `accumulate=True`, or
``--bf16``: bf16 D overwritten; ``--overwrite``: fp32 D overwritten) and the round values;
every config's D is compared with the default config's (``max_abs_diff``).
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
from bench_gemm import bench_graph  # noqa: E402
from bench_wgrad import _uneven, wgrad_problem  # noqa: E402
from gemm_ab import parse_config  # noqa: E402

from moe_fp8.gemm.heuristics import GemmConfig, num_sms, wgrad_config  # noqa: E402
from moe_fp8.gemm.kernels import wgrad as W  # noqa: E402

kCases = [("record shape, 4 experts", 7168, 2048, 4), ("record shape, 8 experts", 7168, 2048, 8),
          ("GEMM1 weight, 4 experts", 4096, 7168, 4)]
kUnevenShapes = [(7168, 2048), (4096, 7168)]
kConfigs = {"128x192 c1": GemmConfig(128, 192), "128x192 c2": GemmConfig(128, 192, cluster_m=2),
            "128x160 c2": GemmConfig(128, 160, cluster_m=2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--configs", default="", help="instead of the width set: pinned configs "
                        "in gemm_ab.py's syntax, e.g. 128x192s2c2d1")
    parser.add_argument("--bf16", action="store_true", help="bf16 D, overwritten")
    parser.add_argument("--overwrite", action="store_true", help="fp32 D, overwritten")
    parser.add_argument("--uneven", action="store_true", help="also the 32-expert uneven rows")
    args = parser.parse_args()
    d_bytes = 2 if args.bf16 else 4
    cases = [(label, m, n, [4096] * experts) for label, m, n, experts in kCases]
    if args.uneven:
        cases += [(f"32 experts uneven, {m} x {n}", m, n, _uneven(3)) for m, n in kUnevenShapes]
    pinned = ({text: parse_config(text) for text in args.configs.split(",") if text}
              if args.configs else kConfigs)
    rows = []
    for label, m, n, counts in cases:
        tokens = sum(counts)
        _, _, (qa, sa), (qb, sb), offsets = wgrad_problem(m, n, counts)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        out = torch.zeros(len(counts), m, n, device="cuda", dtype=dtype)
        configs = {"default": wgrad_config(m, n, num_sms(0), d_bytes), **pinned}
        resolved = {name: c.resolved(0, wgrad=True, wgrad_d_bytes=d_bytes)
                    for name, c in configs.items()}
        times = {name: [] for name in resolved}
        accumulate = not (args.bf16 or args.overwrite)
        diffs = {}
        for name, c in resolved.items():
            d = torch.full_like(out, float("nan"))
            W.k_grouped_tn(qa, sa, qb, sb, offsets, d, c, accumulate=False)
            if name == "default":
                want = d
            diffs[name] = (d.float() - want.float()).abs().max().item()
        for _ in range(args.rounds):
            for name, c in resolved.items():
                times[name].append(bench_graph(
                    lambda c=c: W.k_grouped_tn(qa, sa, qb, sb, offsets, out, c,
                                               accumulate=accumulate), args.repeats))
        flops = 2 * m * n * tokens
        for name, values in times.items():
            c = resolved[name]
            us = statistics.median(values)
            row = {"case": label, "config": f"{name} ({c.block_m}x{c.block_n}s{c.stages}c{c.cluster_m})",
                   "us": us, "TFLOPS": flops / us / 1e6,
                   "max_abs_diff": diffs[name],
                   "rounds_us": "/".join(f"{v:.0f}" for v in values)}
            rows.append(row)
            common.print_row(row)
        torch.cuda.empty_cache()
    d_mode = ("bf16 overwritten" if args.bf16 else "fp32 overwritten" if args.overwrite
              else "fp32 accumulated")
    common.write_results("wgrad_width_probe", rows, f"{args.rounds} interleaved rounds of "
                         f"{args.repeats} L2-flushed graph replays, medians; D {d_mode}")


if __name__ == "__main__":
    main()

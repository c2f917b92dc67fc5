"""A/B timing of k-grouped weight-gradient kernel versions (gemm_ab's method for wgrad.cuh):
copies of the include tree, same process, same inputs, interleaved rounds.

    python benchmarks/experiments/wgrad_ab.py --variant old=.variants/old \
        --variant new=moe_fp8/gemm/include [--rounds 5]

Cases: the record shape (4 experts x 4096 tokens, 7168 x 2048) and 32 experts with ~344 tokens
each (3 empty; 7168 x 2048 and 4096 x 7168), each as fp32 accumulate, fp32 overwrite and bf16
out, at the shipped config. Prints the median over rounds of ``--repeats`` L2-flushed graph
replays, the spread of the round medians and the output's difference against the first version.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemm import bench_graph  # noqa: E402
from bench_wgrad import _uneven, wgrad_problem  # noqa: E402
from common import card  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm import jit  # noqa: E402
from moe_fp8.gemm.kernels import wgrad as W  # noqa: E402

kCases = [("record 4 x 4096", 7168, 2048, [4096] * 4),
          ("32 uneven", 7168, 2048, None), ("32 uneven", 4096, 7168, None)]
kModes = [("fp32 +=", torch.float32, True), ("fp32 =", torch.float32, False),
          ("bf16 =", torch.bfloat16, False)]


@contextlib.contextmanager
def kernels_from(folder: str):
    """Build W's instances from the headers in ``folder`` while active."""
    root = os.path.abspath(folder)
    original = W.kernel_source

    def source(*args, **kwargs):
        src = original(*args, **kwargs)
        return jit.KernelSource(os.path.join(root, src.header), src.instance, src.defines)

    W.kernel_source, W._kernels = source, {}
    try:
        yield
    finally:
        W.kernel_source, W._kernels = original, {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", action="append", required=True, help="name=folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    variants = [v.split("=", 1) for v in args.variant]
    print(f"# wgrad_ab · {card()}")
    print("| case | M | N | tokens | out | version | us | TFLOPS | spread % | diff vs first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, (label, m, n, counts) in enumerate(kCases):
        counts = counts or _uneven(index)
        tokens = sum(counts)
        _, _, (qa, sa), (qb, sb), offsets = wgrad_problem(m, n, counts)
        for mode, dtype, accumulate in kModes:
            outs, graphs, times = {}, {}, {name: [] for name, _ in variants}
            for name, folder in variants:
                out = torch.zeros(len(counts), m, n, device="cuda", dtype=dtype)

                def call(o=out, f=folder):
                    with kernels_from(f):
                        W.k_grouped_tn(qa, sa, qb, sb, offsets, o, accumulate=accumulate)
                if not accumulate:
                    out.fill_(float("nan"))
                call()
                torch.cuda.synchronize()
                outs[name] = out.float().clone()
                graphs[name] = call
            for _ in range(args.rounds):
                for name, _ in variants:
                    times[name].append(bench_graph(graphs[name], args.repeats))
            first = outs[variants[0][0]]
            for name, _ in variants:
                us = statistics.median(times[name])
                spread = (max(times[name]) - min(times[name])) / us * 100
                nan = int(torch.isnan(outs[name]).sum())
                print(f"| {label} | {m} | {n} | {tokens} | {mode} | {name} | {us:.0f} | "
                      f"{2 * m * n * tokens / us / 1e6:.0f} | {spread:.1f} | "
                      f"{G.calc_diff(outs[name], first):.1e}{f' NaN {nan}' if nan else ''} |")
            del outs, graphs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""How fast does the weight-gradient epilogue write D on its own? The k-grouped kernel in
overwrite mode stores zeros for every expert without tokens (tiles with no K block: the epilogue
alone, in the GEMM's tile order and TMA boxes); give one expert 128 tokens and the other 31 none,
and the kernel is nearly a pure writer of D. Timed beside ``D.zero_()`` (a linear write of the
same bytes) and beside the uneven 32-expert GEMM (bench_wgrad's row), L2 flushed, graph replays,
in interleaved rounds.

    python benchmarks/experiments/wgrad_store_probe.py [--rounds 5]

If the store-only kernel writes near ``zero_()``'s rate, the uneven GEMM's 2.3 TB/s (ncu, session
22) is lost to the interplay of writes with the operand reads, not to the tile pattern.
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

from moe_fp8.gemm.kernels import wgrad as W  # noqa: E402

kShapes = [(7168, 2048), (4096, 7168)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for m, n in kShapes:
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(32, m, n, device="cuda", dtype=dtype)
            cases = {}
            _, _, (qa, sa), (qb, sb), offsets = wgrad_problem(m, n, [128] + [0] * 31)
            cases["kernel, 31 of 32 experts empty"] = (
                lambda qa=qa, sa=sa, qb=qb, sb=sb, o=offsets, d=out:
                W.k_grouped_tn(qa, sa, qb, sb, o, d, accumulate=False))
            cases["D.zero_()"] = out.zero_
            _, _, (ua, usa), (ub, usb), uoff = wgrad_problem(m, n, _uneven(3))
            cases["kernel, 32 uneven experts"] = (
                lambda ua=ua, usa=usa, ub=ub, usb=usb, o=uoff, d=out:
                W.k_grouped_tn(ua, usa, ub, usb, o, d, accumulate=False))
            times = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    times[name].append(bench_graph(fn, args.repeats))
            nbytes = out.numel() * out.element_size()
            for name, values in times.items():
                us = statistics.median(values)
                row = {"D": f"32 x {m} x {n} {str(dtype).removeprefix('torch.')}", "case": name,
                       "us": us, "write_TB/s": nbytes / us / 1e6,
                       "rounds_us": "/".join(f"{v:.0f}" for v in values)}
                rows.append(row)
                common.print_row(row)
            del out, cases
            torch.cuda.empty_cache()
    common.write_results("wgrad_store_probe", rows, f"{args.rounds} interleaved rounds of "
                         f"{args.repeats} L2-flushed graph replays, medians; TB/s = D's bytes / time")


if __name__ == "__main__":
    main()

"""One k-grouped weight-gradient call of the uneven 32-expert case (bench_wgrad's 7168 x 2048 row)
per output kind, for a profiler: fp32 overwrite, fp32 accumulate, bf16 out, each called twice
(the first loads the kernel).

    ncu --kernel-name regex:k_grouped --launch-skip 1 --launch-count 1 ... \
        python benchmarks/experiments/wgrad_uneven_once.py [--mode fp32=|fp32+=|bf16]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_wgrad import _uneven, wgrad_problem  # noqa: E402

from moe_fp8.gemm.kernels import wgrad as W  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="fp32=", choices=("fp32=", "fp32+=", "bf16"))
    args = parser.parse_args()
    m, n, counts = 7168, 2048, _uneven(3)
    tokens = sum(counts)
    _, _, (qa, sa), (qb, sb), offsets = wgrad_problem(m, n, counts)
    dtype = torch.bfloat16 if args.mode == "bf16" else torch.float32
    out = torch.zeros(len(counts), m, n, device="cuda", dtype=dtype)
    for _ in range(2):
        W.k_grouped_tn(qa, sa, qb, sb, offsets, out, accumulate=args.mode == "fp32+=")
    torch.cuda.synchronize()
    print(f"tokens {tokens}, D {tuple(out.shape)} {dtype}")


if __name__ == "__main__":
    main()

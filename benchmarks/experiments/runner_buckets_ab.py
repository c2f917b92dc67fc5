"""What a batch pays for replaying a larger graph bucket than it needs, past the masked range.

One DeepSeek-V3-shaped layer (32 experts), two graph runners of ``--max-tokens`` sharing buffers:
A with the default batch sizes (powers of two), B with ``--extra`` sizes added (default: the
1.5x steps 768 and 1536). Each token count of ``--tokens`` is replayed by both (``runner(x)``:
the staging copy and one replay), in turns, L2 flushed, medians of ``--rounds``; the printed
buckets say which graph each replayed. Outputs must agree to the bit where both replay a
contiguous bucket (the rows of a token do not depend on the bucket's size).

    python benchmarks/experiments/runner_buckets_ab.py [--tokens 640,900,1100,1300,1700]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import bench_interleaved, markdown_table  # noqa: E402

from moe_fp8.layers import MoE, MoEConfig  # noqa: E402
from moe_fp8.layers.decode import default_batch_sizes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="640,900,1100,1300,1700")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--extra", default="768,1536")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("runner_buckets_ab.py needs a CUDA GPU")
    moe = MoE(MoEConfig.deepseek_v3(num_experts=32), device="cuda", seed=0)
    sizes_a = default_batch_sizes(args.max_tokens)
    sizes_b = tuple(sorted(set(sizes_a) | {int(s) for s in args.extra.split(",") if s}))
    runner_a = moe.decode_runner(args.max_tokens, batch_sizes=sizes_a)
    runner_b = moe.decode_runner(args.max_tokens, batch_sizes=sizes_b, share_buffers_with=runner_a)
    rows = []
    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",") if t):
            x = torch.randn(n, moe.cfg.hidden_size, device="cuda").bfloat16()
            same = torch.equal(runner_a(x).clone(), runner_b(x))
            a_us, b_us = [], []
            for _ in range(args.rounds):
                a, b = bench_interleaved([lambda: runner_a(x), lambda: runner_b(x)], repeats=10,
                                         warmup=2)
                a_us.append(a)
                b_us.append(b)
            row = {"tokens": n, "bucket_A": runner_a.batch_size_for(n),
                   "bucket_B": runner_b.batch_size_for(n), "A_us": statistics.median(a_us),
                   "B_us": statistics.median(b_us)}
            row["B_minus_A_us"] = row["B_us"] - row["A_us"]
            row["same_bits"] = same
            row["rounds_A"] = "/".join(f"{t:.0f}" for t in a_us)
            row["rounds_B"] = "/".join(f"{t:.0f}" for t in b_us)
            rows.append(row)
            print(row, flush=True)
    print(f"{torch.cuda.get_device_name()}; one layer of 32 experts; runners of {args.max_tokens}: "
          f"A {sizes_a}, B {sizes_b}; {args.rounds} rounds in turns, medians")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

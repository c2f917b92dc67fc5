"""The eager layer (``MoE.forward``, contiguous layout) with an environment switch unset (A) and
set (B), in turns in one process (switches are read at every forward), at prefill sizes.

One DeepSeek-V3-shaped layer (32 experts); device us per forward, L2 flushed before each, medians
over ``--rounds`` rounds of ``common.bench_interleaved``; the two outputs must be bitwise equal.

    python benchmarks/experiments/eager_switch_ab.py --env MOE_FP8_SHARED_BEFORE_ROUTED=1 \
        [--tokens 1024,4096,8192]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import bench_interleaved, env, markdown_table  # noqa: E402

from moe_fp8.layers import MoE, MoEConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", required=True, help="NAME=V[,NAME=V]: B's settings")
    parser.add_argument("--tokens", default="1024,4096,8192")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("eager_switch_ab.py needs a CUDA GPU")
    b_env = dict(item.split("=", 1) for item in args.env.split(",") if item.strip())
    moe = MoE(MoEConfig.deepseek_v3(num_experts=32), device="cuda", seed=0)

    def forward_b(x):
        with env(**b_env):
            return moe(x)

    rows = []
    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, moe.cfg.hidden_size, device="cuda").bfloat16()
            same = torch.equal(moe(x), forward_b(x))
            a_us, b_us = [], []
            for _ in range(args.rounds):
                a, b = bench_interleaved([lambda: moe(x), lambda: forward_b(x)], repeats=10,
                                         warmup=2)
                a_us.append(a)
                b_us.append(b)
            row = {"tokens": n, "A_us": statistics.median(a_us), "B_us": statistics.median(b_us)}
            row["B_minus_A_us"] = row["B_us"] - row["A_us"]
            row["same_bits"] = same
            row["rounds_A"] = "/".join(f"{t:.0f}" for t in a_us)
            row["rounds_B"] = "/".join(f"{t:.0f}" for t in b_us)
            rows.append(row)
    print(f"{torch.cuda.get_device_name()}; one layer of 32 experts; B: {b_env}; "
          f"{args.rounds} rounds in turns, medians")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

"""One decode batch on runners of different max_tokens: the same graph size (the batch's bucket),
different static buffers (M_max = max_tokens rows per expert). Bits must match; the time should
not depend on the runner's size (a 256-token runner's one-token step took 163 us against 156-160
for smaller runners on an H100, 2026-12-06).

    python benchmarks/experiments/runner_size_probe.py [--tokens 1] [--runners 1,4,32,256]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402

from moe_fp8.layers import MoE, MoEConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--runners", default="1,4,32,256")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(v) for v in args.runners.split(",") if int(v) >= args.tokens]
    moe = MoE(MoEConfig.deepseek_v3(num_experts=32), device="cuda", seed=0)
    x = torch.randn(args.tokens, moe.cfg.hidden_size, device="cuda",
                    generator=torch.Generator(device="cuda").manual_seed(1)).bfloat16()
    runs = {m: moe.decode_runner(max_tokens=m) for m in sizes}
    with torch.no_grad():
        outs = {m: run(x).clone() for m, run in runs.items()}
        same = all(torch.equal(outs[sizes[0]], y) for y in outs.values())
        times = {m: [] for m in sizes}
        for _ in range(args.rounds):
            for m, run in runs.items():
                times[m].append(common.bench(lambda: run(x), repeats=20, warmup=3))
    print(f"card: {common.card()} · commit {common.commit()} · flush {common.flush_mode} · "
          f"{args.tokens} token(s) · bits equal across runners: {same}")
    print("| runner max_tokens | graph | us (median of rounds) | rounds |\n|---|---|---|---|")
    for m in sizes:
        print(f"| {m} | {runs[m].batch_size_for(args.tokens)} | {sorted(times[m])[len(times[m]) // 2]:.1f} | "
              + "/".join(f"{t:.1f}" for t in times[m]) + " |")


if __name__ == "__main__":
    main()

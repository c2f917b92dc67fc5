"""Programmatic dependent launch (``MOE_FP8_PDL``, include/pdl.cuh) on and off, same process.

    python benchmarks/bench_pdl.py [--repeats 20]

The layer with 32 local experts at DeepSeek-V3 shapes: the decode step (one CUDA graph, captured
once with PDL off and once on) at 1 / 32 / 128 tokens and the prefill forward (eager) at 4096
tokens. PDL lets each of our kernels start its prologue while the previous kernel finishes, so it
can only remove launch gaps: the outputs must be bit-identical (checked), and the gain should
grow with the number of kernels per microsecond of work (decode). Median device time, L2 flushed.
Results: benchmarks/results/pdl_<date>.{md,csv}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, card, env, write_results  # noqa: E402

from moe_fp8.layers import MoE, MoEConfig  # noqa: E402

kEnv = "MOE_FP8_PDL"


def with_pdl(flag: str, fn):
    """Run ``fn()`` with MOE_FP8_PDL=flag (the launch attribute is read at each launch, and
    captured into a graph at capture time)."""
    with env(**{kEnv: flag}):
        return fn()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_pdl.py needs a CUDA GPU")
    cfg = MoEConfig.deepseek_v3(num_experts=32)
    moe = MoE(cfg, device="cuda", seed=0)
    rows = []
    for tokens in (1, 32, 128):
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, cfg.hidden_size, generator=gen, device="cuda").bfloat16()
        out, us = {}, {}
        for flag in ("0", "1"):
            run = with_pdl(flag, lambda: moe.decode_runner(max_tokens=tokens))  # captured here
            out[flag] = run(x).clone()
            us[flag] = bench(lambda: run(x), repeats=args.repeats, warmup=3)
        rows.append({"case": f"decode graph, {tokens} tokens", "pdl_off_us": us["0"],
                     "pdl_on_us": us["1"], "speedup": us["0"] / us["1"],
                     "bit_identical": bool(torch.equal(out["0"], out["1"]))})
        print(rows[-1], flush=True)
    tokens = 4096
    x = torch.randn(tokens, cfg.hidden_size, device="cuda").bfloat16()
    out, us = {}, {}
    for flag in ("0", "1"):
        out[flag] = with_pdl(flag, lambda: moe(x)).clone()
        us[flag] = with_pdl(flag, lambda: bench(lambda: moe(x), repeats=max(5, args.repeats // 2)))
    rows.append({"case": f"prefill eager, {tokens} tokens", "pdl_off_us": us["0"],
                 "pdl_on_us": us["1"], "speedup": us["0"] / us["1"],
                 "bit_identical": bool(torch.equal(out["0"], out["1"]))})
    summary = (f"{card()}: PDL on vs off, same process; every row must be bit-identical. "
               "Flip MOE_FP8_PDL's default (jit/env.py) only if no row is slower.")
    write_results("pdl", rows, summary)
    print(summary)


if __name__ == "__main__":
    main()

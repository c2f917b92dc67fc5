"""The decode step built two ways in one process, timed in interleaved rounds (GPU only; ~1 min).

A build is a set of GEMM compile-time macros (``fp8_gemm.extra_defines``, part of each instance's
cache key, so both builds' kernels coexist) and environment switches, applied while its decode
runners are captured (session 16: an L2 evict_first policy on the masked weight loads as a build
macro; ``MOE_FP8_SWAP_AB_DOWN`` as a switch). The layer is bench_layer's (32 experts,
DeepSeek-V3 shapes); each token count gets one runner per build, timed under the clean flush;
the outputs of the two builds must be bitwise equal (``--max-diff D``: or within calc_diff D,
for builds that sum in another order, e.g. MOE_FP8_MASKED_SPLIT_K). Prints one dict per row.

    python benchmarks/decode_build_ab.py [--tokens 1,32,128,256] [--rounds 3]
        [--a-defines NAME=V,...] [--b-defines ...] [--a-env NAME=V,...] [--b-env ...]
        [--max-diff D] [--eager]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_layer import expert_bytes  # noqa: E402

from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.reference import calc_diff  # noqa: E402
from moe_fp8.layers import MoE, MoEConfig  # noqa: E402


def _pairs(text: str) -> dict:
    """``"A=1,B=2"`` -> {"A": "1", "B": "2"}."""
    return dict(item.split("=", 1) for item in text.split(",") if item.strip())


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,32,128,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--a-defines", default="")
    parser.add_argument("--b-defines", default="")
    parser.add_argument("--a-env", default="")
    parser.add_argument("--b-env", default="")
    parser.add_argument("--max-diff", type=float, default=0.0)
    parser.add_argument("--eager", action="store_true",
                        help="also time the eager forward (contiguous layout) in the same rounds")
    args = parser.parse_args()
    builds = {"A": (_pairs(args.a_defines), _pairs(args.a_env)),
              "B": (_pairs(args.b_defines), _pairs(args.b_env))}
    cfg = MoEConfig.deepseek_v3(num_experts=32)
    moe = MoE(cfg, device="cuda", seed=0)
    bandwidth = common.copy_bandwidth_gbs()
    per_expert, shared = expert_bytes(moe)
    rows = []
    with common.flush_as("clean"):
        for n in (int(t) for t in args.tokens.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(1000 + n)
            x = torch.randn(n, cfg.hidden_size, generator=gen, device="cuda").bfloat16()
            runs, outs = {}, {}
            for name, (defines, env) in builds.items():
                K.extra_defines = tuple(defines.items())
                with common.env(**env):
                    runs[name] = moe.decode_runner(max_tokens=n)
                    outs[name] = runs[name](x).clone()
            K.extra_defines = ()
            touched = int(torch.unique(moe.gate(x).topk_idx).numel())
            floor_us = (touched * per_expert + shared) / (bandwidth * 1e3)
            row = {"tokens": n, "floor_us": floor_us,
                   "same_bits": torch.equal(outs["A"], outs["B"]),
                   "diff": calc_diff(outs["A"], outs["B"])}
            times = {name: [] for name in builds}
            if args.eager:
                runs["eager"] = moe
                times["eager"] = []
            for _ in range(args.rounds):
                for name, run in runs.items():
                    times[name].append(common.bench(lambda: run(x), repeats=args.repeats, warmup=3))
            for name, values in times.items():
                row[f"{name}_us"] = sorted(values)[len(values) // 2]
                row[f"{name}_rounds"] = "/".join(f"{v:.1f}" for v in values)
            row["B_minus_A_us"] = row["B_us"] - row["A_us"]
            rows.append(row)
            common.print_row(row)
            del runs
            torch.cuda.empty_cache()
        common.write_results("decode_build_ab", rows,
                             f"A: defines {builds['A'][0]} env {builds['A'][1]}; B: defines "
                             f"{builds['B'][0]} env {builds['B'][1]}; decode runners (graphs), clean "
                             f"flush, {args.rounds} interleaved rounds, medians")
    if not all(r["same_bits"] or r["diff"] <= args.max_diff for r in rows):
        raise SystemExit("the two builds' outputs differ")


if __name__ == "__main__":
    main()

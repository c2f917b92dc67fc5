"""GemmConfig.early_b on the decode step's GEMM chain alone (GPU only; seconds).

The one-token routed experts as a graph captured with programmatic dependent launch, as the
decode runner captures it: gate-up GEMM (8 of 32 experts x 1 row) -> masked SiLU-and-mul +
quantisation -> down GEMM, and the same with the fused SwiGLU gate-up (no SiLU kernel). The down
GEMM runs plain, then with ``early_b`` (its first weight slots loaded before its PDL wait), same
inputs, interleaved rounds; the outputs must be bitwise equal. Prints one dict per row.

    python benchmarks/early_b_pair.py [--repeats 30] [--rounds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_gemm import graph_replay  # noqa: E402
from bench_grouped import _act, _rand  # noqa: E402

from moe_fp8 import gemm as G  # noqa: E402
from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.heuristics import masked_config, num_sms  # noqa: E402
from moe_fp8.gemm.jit.env import pdl_scope  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402

kExperts, kActive, kMaxRows, kHidden, kInter = 32, 8, 128, 7168, 2048


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sms = num_sms(torch.cuda.current_device())
    gen = torch.Generator(device="cuda").manual_seed(5)
    qa, sa = _act(_rand((kExperts, kMaxRows, kHidden), gen))
    w13, s13 = ref.per_block_quant(_rand((kExperts, 2 * kInter, kHidden), gen))
    w2, s2 = ref.per_block_quant(_rand((kExperts, kHidden, kInter), gen))
    masked_m = torch.tensor([1] * kActive + [0] * (kExperts - kActive), dtype=torch.int32,
                            device="cuda")
    h = torch.zeros(kExperts, kMaxRows, 2 * kInter, dtype=torch.bfloat16, device="cuda")
    act = torch.zeros(kExperts, kMaxRows, kInter, dtype=torch.float8_e4m3fn, device="cuda")
    act_s = empty_act_scales(kMaxRows, kInter // 128, kExperts, device="cuda")
    y = torch.zeros(kExperts, kMaxRows, kHidden, dtype=torch.bfloat16, device="cuda")
    up_cfg = masked_config(kExperts, 1, 2 * kInter, kHidden, sms)
    down_plain = masked_config(kExperts, 1, kHidden, kInter, sms)
    down_early = dataclasses.replace(down_plain, early_b=True)

    def step(fused, down_cfg):
        if fused:
            K.m_grouped_masked_swiglu(qa, sa, w13, s13, masked_m, 1, act, act_s)
        else:
            K.m_grouped_masked(qa, sa, w13, s13, masked_m, 1, h, up_cfg)
            G.silu_and_mul_quant_fp8(h, masked_m=masked_m, out=(act, act_s), expected_m=1)
        K.m_grouped_masked(act, act_s, w2, s2, masked_m, 1, y, down_cfg)

    graphs = {}
    for fused in (False, True):
        for label, cfg in (("plain", down_plain), ("early_b", down_early)):
            with pdl_scope(True):
                graphs[(fused, label)] = graph_replay(lambda f=fused, c=cfg: step(f, c))
    outputs = {}
    for key, replay in graphs.items():
        y.zero_()
        replay()
        torch.cuda.synchronize()
        outputs[key] = y[:kActive, :1].clone()
    for fused in (False, True):
        same = torch.equal(outputs[(fused, "plain")], outputs[(fused, "early_b")])
        print({"chain": "fused SwiGLU" if fused else "gate-up + SiLU", "same_bits": same}, flush=True)
        if not same:
            raise SystemExit("early_b changed the down GEMM's output")
    rows = []
    for fused in (False, True):
        row = {"chain": "fused SwiGLU -> down" if fused else "gate-up -> SiLU -> down",
               "down_config": f"{down_plain.block_m}x{down_plain.block_n}r{down_plain.a_row_chunk}"}
        for rnd in range(1, args.rounds + 1):
            for label in ("plain", "early_b"):
                row[f"{label}_{rnd}_us"] = common.bench(graphs[(fused, label)], repeats=args.repeats)
        rows.append(row)
        common.print_row(row)
    common.write_results("early_b_pair", rows, "one-token routed experts (8 of 32 x 1 row), graphs "
                         "captured with PDL; the down GEMM plain vs early_b, interleaved rounds")


if __name__ == "__main__":
    main()

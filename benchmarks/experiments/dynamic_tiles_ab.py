"""The contiguous grouped GEMMs with fixed-stride tiles (A) and with dynamic tiles (B,
include/tile_claim.cuh), alone and beside a kernel that holds most SMs when they start.

Per shape (DeepSeek-V3's gate-up with the fused SwiGLU epilogue, 4096 x 7168, and down,
7168 x 2048; G experts x M rows, plus 32 uneven experts), the default config, L2 flushed,
medians of ``--rounds`` rounds of ``common.bench_interleaved``:
* ``alone``: the GEMM by itself (B pays the claims; predicted within +-1 %);
* ``contended``: a dense FP8 GEMM pinned to ``--side-sms`` SMs is launched on a side stream just
  before the grouped GEMM, and the pair is timed from before the side launch to after both (the
  layer's shared expert against the routed GEMMs, session 33's graph bucket). A's late CTAs keep
  their share of the tiles; B's should take fewer.
Outputs of A and B must be bitwise equal.

    python benchmarks/experiments/dynamic_tiles_ab.py [--rounds 3] [--side-sms 100]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import bench_interleaved, markdown_table  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm.heuristics import GemmConfig  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import build_m_indices, empty_act_scales  # noqa: E402

FP8 = torch.float8_e4m3fn


def _case(counts, n, k, gen):
    m_indices = build_m_indices(counts, device="cuda")
    rows = m_indices.shape[0]
    a = G.per_token_group_quant_fp8(torch.randn(rows, k, device="cuda", generator=gen).bfloat16())
    b = G.per_block_quant_fp8(torch.randn(len(counts), n, k, device="cuda",
                                          generator=gen).bfloat16())
    return m_indices, a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side-sms", type=int, default=100)
    parser.add_argument("--side-m", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dynamic_tiles_ab.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    uneven = torch.randint(0, 700, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    shapes = [("swiglu", [4096] * 8, 4096, 7168), ("swiglu", uneven, 4096, 7168),
              ("gemm", [4096] * 8, 7168, 2048), ("gemm", uneven, 7168, 2048),
              ("swiglu", [1024] * 8, 4096, 7168), ("gemm", [1024] * 8, 7168, 2048)]
    side_a = G.per_token_group_quant_fp8(torch.randn(args.side_m, 2048, device="cuda").bfloat16())
    side_b = G.per_block_quant_fp8(torch.randn(7168, 2048, device="cuda").bfloat16())
    side_out = torch.empty(args.side_m, 7168, dtype=torch.bfloat16, device="cuda")
    side_config = GemmConfig(128, 256, num_sms=args.side_sms)
    side = torch.cuda.Stream()
    counter = G.new_tile_counter("cuda")
    rows = []
    for kind, counts, n, k in shapes:
        m_indices, (qa, sa), (qb, sb) = _case(counts, n, k, gen)
        m_sum = m_indices.shape[0]
        if kind == "swiglu":
            outs = [(torch.empty(m_sum, n // 2, dtype=FP8, device="cuda"),
                     empty_act_scales(m_sum, n // 256, device="cuda")) for _ in range(2)]

            def op(i, tiles):
                K.m_grouped_contiguous_swiglu(qa, sa, qb, sb, m_indices, *outs[i],
                                              tile_counter=tiles)
        else:
            outs = [torch.empty(m_sum, n, dtype=torch.bfloat16, device="cuda") for _ in range(2)]

            def op(i, tiles):
                K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, outs[i], None,
                                       tile_counter=tiles)

        def contended(i, tiles):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                G.fp8_gemm_nt(side_a, side_b, out=side_out, config=side_config)
            op(i, tiles)
            torch.cuda.current_stream().wait_stream(side)

        op(0, None)
        op(1, counter)
        torch.cuda.synchronize()
        valid = m_indices >= 0
        if kind == "swiglu":
            same = all(torch.equal(x[valid].view(torch.uint8), y[valid].view(torch.uint8))
                       if x.dtype == FP8 else torch.equal(x[valid], y[valid])
                       for x, y in zip(outs[0], outs[1]))
        else:
            same = torch.equal(outs[0][valid], outs[1][valid])
        label = f"{len(counts)}x{counts[0]}" if len(set(counts)) == 1 else f"32 uneven ({m_sum})"
        for mode, fn in (("alone", op), ("contended", contended)):
            a_us, b_us = [], []
            for _ in range(args.rounds):
                a, b = bench_interleaved([lambda: fn(0, None), lambda: fn(1, counter)],
                                         repeats=20, warmup=3)
                a_us.append(a)
                b_us.append(b)
            row = {"op": kind, "experts x rows": label, "N": n, "K": k, "mode": mode,
                   "A_static_us": statistics.median(a_us), "B_dynamic_us": statistics.median(b_us)}
            row["B_minus_A_us"] = row["B_dynamic_us"] - row["A_static_us"]
            row["B_over_A"] = row["B_dynamic_us"] / row["A_static_us"]
            row["same_bits"] = same
            row["rounds_A"] = "/".join(f"{t:.0f}" for t in a_us)
            row["rounds_B"] = "/".join(f"{t:.0f}" for t in b_us)
            rows.append(row)
            print(row, flush=True)
    assert counter.tolist() == [0, 0], counter
    print(f"{torch.cuda.get_device_name()}; default configs; side kernel: dense {args.side_m} x "
          f"7168 x 2048 on {args.side_sms} SMs; {args.rounds} rounds in turns, medians")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

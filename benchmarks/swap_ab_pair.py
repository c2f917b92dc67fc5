"""GemmConfig.swap_ab against the masked configs the decode step runs today (GPU only; ~1 min).

The routed experts of a decode step over 32 experts, each row count drawn around a batch's mean
(256 tokens x top-8: 48-80 rows, 128: 24-40, 64: 10-22, 1 token: 8 experts x 1 row):

* the down GEMM alone (N 7168, K 2048): the heuristic's config vs swap AB (token tile 64 or 128);
* the gate-up GEMM alone, unfused (N 4096, K 7168, bf16 out): the same pair (whether the 256-token
  gate-up's 128-row MMAs bound it, the question a fused swap-AB SwiGLU would answer);
* the chain the layer runs, gate-up with SiLU -> down, as a graph with PDL (early weights on the
  down GEMM): today's fused SwiGLU -> down vs fused SwiGLU -> swap-AB down vs swap-AB gate-up ->
  SiLU kernel -> swap-AB down.

Same inputs, interleaved rounds, L2 flushed clean before each repeat; the swap-AB outputs are
checked against the plain ones (calc_diff, and whether the bits are equal). One dict per row.

    python benchmarks/swap_ab_pair.py [--repeats 20] [--rounds 3]
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
from moe_fp8.gemm import heuristics as H  # noqa: E402
from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.jit.env import pdl_scope  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402

kExperts, kMaxRows, kHidden, kInter = 32, 128, 7168, 2048
# batch label -> (row counts per expert, expected_m as the layer passes it)
kBatches = {"1 token": ([1] * 8 + [0] * 24, 1), "64 tokens": ((10, 22), 16),
            "128 tokens": ((24, 40), 32), "256 tokens": ((48, 80), 64)}


def _counts(spec, seed):
    if isinstance(spec, list):
        return torch.tensor(spec, dtype=torch.int32, device="cuda")
    low, high = spec
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (kExperts,), generator=gen, dtype=torch.int32).cuda()


def _swap(rows_max: int, early_b: bool = False) -> H.GemmConfig:
    block_m = 64 if rows_max <= 64 else 128
    return H.GemmConfig(block_m, 128, a_row_chunk=16, swap_ab=True, early_b=early_b)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sms = H.num_sms(torch.cuda.current_device())
    gen = torch.Generator(device="cuda").manual_seed(9)
    w13, s13 = ref.per_block_quant(_rand((kExperts, 2 * kInter, kHidden), gen))
    w2, s2 = ref.per_block_quant(_rand((kExperts, kHidden, kInter), gen))
    w13, w2 = w13.contiguous(), w2.contiguous()
    x, xs = _act(_rand((kExperts, kMaxRows, kHidden), gen))
    h_in, h_in_s = _act(_rand((kExperts, kMaxRows, kInter), gen))
    h = torch.zeros(kExperts, kMaxRows, 2 * kInter, dtype=torch.bfloat16, device="cuda")
    h_plain, h_swap = torch.zeros_like(h), torch.zeros_like(h)
    act = torch.zeros(kExperts, kMaxRows, kInter, dtype=torch.float8_e4m3fn, device="cuda")
    act_s = empty_act_scales(kMaxRows, kInter // 128, kExperts, device="cuda")
    ys = {name: torch.zeros(kExperts, kMaxRows, kHidden, dtype=torch.bfloat16, device="cuda")
          for name in ("plain", "swap", "chain_plain", "chain_swap_down", "chain_swap_all")}
    rows = []
    with common.flush_as("clean"):
        for batch, (spec, expected_m) in kBatches.items():
            masked_m = _counts(spec, seed=expected_m)
            rows_max = int(masked_m.max())
            down_plain = H.masked_config(kExperts, expected_m, kHidden, kInter, sms)
            down_early = dataclasses.replace(down_plain, early_b=True)

            def down(cfg, y):
                return lambda: K.m_grouped_masked(h_in, h_in_s, w2, s2, masked_m, expected_m, y,
                                                  cfg)

            def chain(gate_up_swap, down_cfg, y):
                def step():
                    if gate_up_swap:
                        K.m_grouped_masked(x, xs, w13, s13, masked_m, expected_m, h, _swap(rows_max))
                        G.silu_and_mul_quant_fp8(h, masked_m=masked_m, out=(act, act_s),
                                                 expected_m=expected_m)
                    else:
                        K.m_grouped_masked_swiglu(x, xs, w13, s13, masked_m, expected_m, act,
                                                  act_s)
                    K.m_grouped_masked(act, act_s, w2, s2, masked_m, expected_m, y, down_cfg)
                return step

            gate_up_plain = H.masked_config(kExperts, expected_m, 2 * kInter, kHidden, sms)

            def gate_up(cfg, out):
                return lambda: K.m_grouped_masked(x, xs, w13, s13, masked_m, expected_m, out, cfg)

            cases = {
                "gate-up plain": gate_up(gate_up_plain, h_plain),
                "gate-up swap": gate_up(_swap(rows_max), h_swap),
                "down plain": down(down_plain, ys["plain"]),
                "down swap": down(_swap(rows_max), ys["swap"]),
                "chain fused->down": chain(False, down_early, ys["chain_plain"]),
                "chain fused->swap down": chain(False, _swap(rows_max, True),
                                                ys["chain_swap_down"]),
                "chain swap gate-up->SiLU->swap down": chain(True, _swap(rows_max, True),
                                                             ys["chain_swap_all"]),
            }
            graphs = {}
            for name, fn in cases.items():
                with pdl_scope(True):
                    graphs[name] = graph_replay(fn)
            torch.cuda.synchronize()
            valid = ref.masked_row_mask(kMaxRows, masked_m)
            checks = {"gate_up_swap_diff": G.calc_diff(h_swap[valid], h_plain[valid]),
                      "gate_up_swap_same_bits": torch.equal(h_swap[valid], h_plain[valid])}
            for a, b in (("plain", "swap"), ("chain_plain", "chain_swap_down"),
                         ("chain_plain", "chain_swap_all")):
                checks[f"{b}_diff"] = G.calc_diff(ys[b][valid], ys[a][valid])
                checks[f"{b}_same_bits"] = torch.equal(ys[b][valid], ys[a][valid])
            row = {"batch": batch, "rows": f"{int(masked_m.min())}-{rows_max}",
                   "gate_up_config": f"{gate_up_plain.block_m}x{gate_up_plain.block_n}"
                                     f"s{gate_up_plain.stages}r{gate_up_plain.a_row_chunk}",
                   "plain_config": f"{down_plain.block_m}x{down_plain.block_n}"
                                   f"r{down_plain.a_row_chunk}", **checks}
            times = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, replay in graphs.items():
                    times[name].append(common.bench(replay, repeats=args.repeats))
            for name, values in times.items():
                row[f"{name} us"] = min(values)
                row[f"{name} us (rounds)"] = "/".join(f"{v:.1f}" for v in values)
            rows.append(row)
            common.print_row(row)
            del graphs
        common.write_results("swap_ab_pair", rows, "decode routed experts over 32 experts; graphs "
                             "with PDL, clean flush, interleaved rounds (best round shown, all "
                             "rounds beside); diffs: calc_diff of the swap-AB outputs against the "
                             "plain ones on the valid rows")


if __name__ == "__main__":
    main()

"""Why a dense GEMM at M = 1 runs slower than at M = 64 (ncu, H100 2026-12-05: 1 x 4096 x 7168
24 us, 64 x 4096 x 7168 16 us, the same 90 MB reaching the SMs).

First run (H100, 2026-12-05, ae37463): padding the activation scales' rows to 32 floats changed
nothing; holding A in a 64-row buffer (the tile's box read in bounds) took M = 1 from 26.1 to
22.0 us: TMA's fill of out-of-bounds rows is the cost (it grows with the rows past M). This run
times the heuristic config against the same tile loading A in 8 / 16 / 32-row chunks (only those
below M), and the in-bounds 64-row buffer as the bound.

    python benchmarks/experiments/small_m_probe.py
"""
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemm import bench_graph, make_inputs  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm.heuristics import dense_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402

kChunks = (0, 8, 16, 32)


def main():
    print("| N | K | M | config | " + " | ".join(f"us r{c}" for c in kChunks)
          + " | us (A in bounds) | diff r8 vs r0 |")
    print("|---|---|---|---|" + "---|" * (len(kChunks) + 2))
    for n, k in ((4096, 7168), (7168, 2048)):
        for m in (1, 4, 8, 16, 32, 48, 64, 96, 128):
            qa, sa, qb, sb = make_inputs(m, n, k)
            base = dense_config(m, n, k, num_sms(0))
            if base.split_k > 1:
                continue
            row, outs = [], {}
            for chunk in kChunks:
                cfg = dataclasses.replace(base, a_row_chunk=chunk)
                out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                row.append(bench_graph(lambda: G.fp8_gemm_nt((qa, sa), (qb, sb), out=out,
                                                              backend="kernel", config=cfg), 20))
                outs[chunk] = out
            bm = base.block_m
            qa2, sa2, _, _ = make_inputs(max(m, bm) if m % bm == 0 else (m // bm + 1) * bm, n, k)
            out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            tiles = -(-m // bm) * -(-n // base.block_n)
            row.append(bench_graph(lambda: K._launch(K.kLayoutDense, qa2, K._sa_view(sa2),
                                                     qa2.shape[0], qb, sb, out, None, m, 1, n, k,
                                                     base, tiles), 20))
            diff = G.calc_diff(outs[8], outs[0])
            print(f"| {n} | {k} | {m} | {bm}x{base.block_n} | "
                  + " | ".join(f"{t:.1f}" for t in row) + f" | {diff:.1e} |")


if __name__ == "__main__":
    main()

"""Why a dense GEMM at M = 1 runs slower than at M = 64 (ncu, H100 2026-12-05: 1 x 4096 x 7168
24 us, 64 x 4096 x 7168 16 us, the same 90 MB reaching the SMs, one L2 slice with twice the
average sectors at M = 1). Times the shipped kernel over M = 1 .. 64 at the two shared-expert
shapes, with the activation scales at their shipped row padding (4 floats: at M = 1 every K
block's scale shares ~7 cache lines with the rest), padded to 32 floats (one line per K block),
and with A and its scales held in 64-row buffers that the kernel's TMA boxes read in full (no
out-of-bounds rows; the output keeps M rows).

    python benchmarks/experiments/small_m_probe.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemm import bench_graph, cublas_blockwise, make_inputs  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm import layout  # noqa: E402
from moe_fp8.gemm.heuristics import dense_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402


def main():
    cublas = cublas_blockwise()
    print("| N | K | M | config | us (scale rows pad 4) | us (pad 32) | us (A in 64 rows) | cuBLAS us |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in ((4096, 7168), (7168, 2048)):
        for m in (1, 2, 4, 8, 16, 32, 64):
            row = []
            for pad in (4, 32):
                layout.kScaleRowAlign = pad
                qa, sa, qb, sb = make_inputs(m, n, k)
                assert sa.stride(-1) == (m + pad - 1) // pad * pad
                out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                row.append(bench_graph(lambda: G.fp8_gemm_nt((qa, sa), (qb, sb), out=out), 20))
            layout.kScaleRowAlign = 4
            qa, sa, qb, sb = make_inputs(64, n, k)  # rows >= m: real data the output never shows
            out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            cfg = dense_config(m, n, k, num_sms(0))
            tiles = -(-n // cfg.block_n)
            row.append(bench_graph(lambda: K._launch(K.kLayoutDense, qa, K._sa_view(sa), 64, qb, sb, out,
                                                     None, m, 1, n, k, cfg, tiles), 20))
            try:
                qa, sa, qb, sb = make_inputs(m, n, k)
                cub = f"{bench_graph(lambda: cublas(qa, sa, qb, sb), 20):.1f}"
            except Exception as exc:  # noqa: BLE001 - a peer's shape limits
                cub = f"n/a ({type(exc).__name__})"
            print(f"| {n} | {k} | {m} | {cfg.block_m}x{cfg.block_n} | {row[0]:.1f} | {row[1]:.1f} | "
                  f"{row[2]:.1f} | {cub} |")


if __name__ == "__main__":
    main()

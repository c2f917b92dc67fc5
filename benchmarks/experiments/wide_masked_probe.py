"""Would the masked record shapes gain from 128 x 256 tiles and B multicast, as the dense and
contiguous large-M GEMMs did? The masked heuristic never offers 256-wide tiles, and the masked
scheduler has no B-multicast pairs. A one-expert masked GEMM of M rows is the dense M x N x K GEMM,
so the dense kernel times the multicast variant the masked one lacks. (Session 21 gave the masked
scheduler B-multicast pairs and timed them here: within the spread, removed; code in 16f810b.)

    python benchmarks/experiments/wide_masked_probe.py

Prints, per record shape (E x M_max, N, K): the masked kernel at the heuristic's tile and at
128 x 256, and the dense kernel over the same E * M_max rows at 128 x 128, 128 x 256 and
128 x 256 with B multicast (TFLOPS; L2 flushed, graph replays, medians, 3 interleaved rounds).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
from bench_gemm import bench_graph, make_inputs  # noqa: E402

from moe_fp8.gemm.heuristics import GemmConfig, masked_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402

kShapes = [(1, 1024, 4096, 7168), (1, 1024, 7168, 2048), (2, 512, 4096, 7168),
           (2, 512, 7168, 2048), (4, 256, 4096, 7168), (4, 256, 7168, 2048)]
kDense = {"dense 128x128": GemmConfig(128, 128), "dense 128x256": GemmConfig(128, 256),
          "dense 128x256 c2": GemmConfig(128, 256, cluster_m=2)}


def main():
    sms = num_sms(0)
    rows = []
    for g, m_max, n, k in kShapes:
        qa, sa, qb, sb = make_inputs(g * m_max, n, k)
        qa3 = qa.view(g, m_max, k)
        sa3 = empty_act_scales(m_max, k // 128, g, device="cuda")
        sa3.copy_(sa.reshape(g, m_max, k // 128))
        qb3 = qb.unsqueeze(0).expand(g, n, k).contiguous()
        sb3 = sb.unsqueeze(0).expand(g, *sb.shape).contiguous()
        masked_m = torch.full((g,), m_max, dtype=torch.int32, device="cuda")
        out3 = torch.empty(g, m_max, n, dtype=torch.bfloat16, device="cuda")
        out = out3.view(g * m_max, n)
        heuristic = masked_config(g, m_max, n, k, sms)
        cases = {f"masked {heuristic.block_m}x{heuristic.block_n} (heuristic)": lambda c=heuristic:
                 K.m_grouped_masked(qa3, sa3, qb3, sb3, masked_m, m_max, out3, c),
                 "masked 128x256": lambda: K.m_grouped_masked(qa3, sa3, qb3, sb3, masked_m, m_max,
                                                               out3, GemmConfig(128, 256))}
        if g == 1:
            cases.update({name: (lambda c=c: K.fp8_gemm_nt(qa, sa, qb, sb, out, c))
                          for name, c in kDense.items()})
        times = {name: [] for name in cases}
        for _ in range(3):
            for name, fn in cases.items():
                times[name].append(bench_graph(fn, 20))
        flops = 2 * g * m_max * n * k
        for name, ts in times.items():
            us = sorted(ts)[1]
            rows.append({"E": g, "M_max": m_max, "N": n, "K": k, "kernel": name, "us": us,
                         "TFLOPS": flops / us / 1e6, "rounds": "/".join(f"{t:.1f}" for t in ts)})
            common.print_row(rows[-1])
    print(f"card: {common.card()} · commit {common.commit()}")
    print(common.markdown_table(rows))


if __name__ == "__main__":
    main()

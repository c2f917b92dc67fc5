"""The prefill's gate-up step alone: contiguous GEMM + SiLU-and-mul kernel vs the fused SwiGLU
GEMM (GPU only; seconds).

DeepSeek-V3's gate-up (2I = 4096, H = 7168) over 32 experts, ``tokens x 8`` routed rows spread at
random over them (the contiguous layout, m_indices). Per row: the GEMM alone (h written), the
SiLU-and-mul + quantisation alone, the two in sequence, the fused kernel, and the fused kernel on
the ring that fits without an output tile (``deep``: MOE_FP8_SWIGLU_DEEP_RING's config);
interleaved rounds, medians, L2 flushed. The act bytes and scales of the paths must be equal on
every expert row.
Tells what ``MOE_FP8_PREFILL_SWIGLU`` saves without the layer's other kernels around it.

    python benchmarks/prefill_swiglu_pair.py [--tokens 4096 8192 16384] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_grouped import _act, _rand  # noqa: E402

from moe_fp8 import gemm as G  # noqa: E402
from moe_fp8.gemm import heuristics as H  # noqa: E402
from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import build_m_indices, empty_act_scales  # noqa: E402

kExperts, kTopK, kHidden, kInter = 32, 8, 7168, 2048


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(14)
    w13, s13 = ref.per_block_quant(_rand((kExperts, 2 * kInter, kHidden), gen))
    w13 = w13.contiguous()
    rows = []
    for tokens in args.tokens:
        counts = torch.bincount(torch.randint(0, kExperts, (tokens * kTopK,), generator=gen,
                                              device="cuda"), minlength=kExperts).cpu()
        m_indices = build_m_indices(counts, device="cuda")
        m_sum = m_indices.numel()
        qa, sa = _act(_rand((m_sum, kHidden), gen))
        h = torch.empty(m_sum, 2 * kInter, dtype=torch.bfloat16, device="cuda")
        act = torch.empty(m_sum, kInter, dtype=torch.float8_e4m3fn, device="cuda")
        act_s = empty_act_scales(m_sum, kInter // 128, device="cuda")
        fused_q, deep_q = torch.empty_like(act), torch.empty_like(act)
        fused_s = empty_act_scales(m_sum, kInter // 128, device="cuda")
        deep_s = empty_act_scales(m_sum, kInter // 128, device="cuda")
        shipped = H.contiguous_swiglu_config(m_sum, 2 * kInter, kHidden, H.num_sms(0))
        with common.env(MOE_FP8_SWIGLU_DEEP_RING="1"):
            deep_config = H.contiguous_swiglu_config(m_sum, 2 * kInter, kHidden, H.num_sms(0))

        def gemm():
            K.m_grouped_contiguous(qa, sa, w13, s13, m_indices, h)

        def silu():
            G.silu_and_mul_quant_fp8(h, out=(act, act_s))

        def pair():
            gemm()
            silu()

        def fused():
            K.m_grouped_contiguous_swiglu(qa, sa, w13, s13, m_indices, fused_q, fused_s)

        def deep():
            K.m_grouped_contiguous_swiglu(qa, sa, w13, s13, m_indices, deep_q, deep_s,
                                          config=deep_config)

        pair()
        fused()
        deep()
        torch.cuda.synchronize()
        valid = m_indices >= 0
        same = all(torch.equal(act.view(torch.uint8)[valid], q.view(torch.uint8)[valid]) and
                   torch.equal(act_s[valid].view(torch.int32), s_[valid].view(torch.int32))
                   for q, s_ in ((fused_q, fused_s), (deep_q, deep_s)))
        row = {"tokens": tokens, "rows": m_sum, "same_bytes": same,
               "deep_stages": f"{shipped.stages} -> {deep_config.stages}"}
        names = ("gemm", "silu", "pair", "fused", "deep")
        for rnd in range(1, args.rounds + 1):
            for name, fn in zip(names, (gemm, silu, pair, fused, deep)):
                row[f"{name}_{rnd}_us"] = common.bench(fn, repeats=args.repeats)
        best = {name: min(row[f"{name}_{r}_us"] for r in range(1, args.rounds + 1))
                for name in names}
        row["fused_vs_pair"] = best["fused"] / best["pair"]
        row["deep_vs_fused"] = best["deep"] / best["fused"]
        rows.append(row)
        common.print_row(row)
        if not same:
            raise SystemExit(f"T={tokens}: a fused SwiGLU GEMM's act differs from GEMM + SiLU")
        qa = sa = h = act = act_s = fused_q = fused_s = deep_q = deep_s = None  # free them
        torch.cuda.empty_cache()
    common.write_results("prefill_swiglu_pair", rows, "gate-up (2I 4096, H 7168) over 32 experts, "
                         "tokens x 8 rows at random; the contiguous GEMM, the SiLU-and-mul kernel, "
                         "both, the fused SwiGLU GEMM and its deep ring; interleaved rounds; "
                         "fused_vs_pair, deep_vs_fused: best round of each")


if __name__ == "__main__":
    main()

"""Does the weights' memory order cost streaming bandwidth? (GPU only; about a minute.)

A GEMM tile reads its B box (its rows at one K block) as rows of 128 bytes at a stride of K: a
one-token decode step's gate-up streams at ~2.8 TB/s on an H100 against a 3.0 TB/s copy. The
experiment stores the weights K-block-major, ``[E, K/128, N, 128]``, so that every box is one
contiguous run, and builds the GEMMs with ``MOE_FP8_BLOCKED_B`` (gemm_core.cuh, a 3-D B
descriptor; the shared-memory tiles are the same). Same inputs, interleaved rounds, L2 flushed
clean before each repeat; the outputs must be bitwise equal. Prints one dict per row.

    python benchmarks/blocked_b_pair.py [--repeats 30] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_gemm import graph_replay  # noqa: E402
from bench_grouped import _act, _rand  # noqa: E402

from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.jit.env import pdl_scope  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402

kExperts, kMaxRows, kHidden, kInter = 32, 128, 7168, 2048
kBlocked = (("MOE_FP8_BLOCKED_B", 1),)


def k_block_major(w: torch.Tensor) -> torch.Tensor:
    """``w [E, N, K]`` with its memory reordered to ``[E, K/128, N, 128]``, returned under the
    ``[E, N, K]`` shape the ops check (only the blocked-B kernels read it correctly)."""
    e, n, k = w.shape
    return w.view(e, n, k // 128, 128).permute(0, 2, 1, 3).contiguous().view(e, n, k)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(7)
    w13, s13 = ref.per_block_quant(_rand((kExperts, 2 * kInter, kHidden), gen))
    w2, s2 = ref.per_block_quant(_rand((kExperts, kHidden, kInter), gen))
    wd, sd = ref.per_block_quant(_rand((1, kHidden, 16384), gen))
    blocked = {"w13": k_block_major(w13), "w2": k_block_major(w2), "wd": k_block_major(wd)}
    plain = {"w13": w13, "w2": w2, "wd": wd}
    x, xs = _act(_rand((kExperts, kMaxRows, kHidden), gen))
    h, hs = _act(_rand((kExperts, kMaxRows, kInter), gen))
    xd, xds = _act(_rand((64, 16384), gen))
    one = torch.tensor([1] * 8 + [0] * 24, dtype=torch.int32, device="cuda")
    spread = torch.randint(48, 81, (kExperts,), generator=torch.Generator().manual_seed(3),
                           dtype=torch.int32).cuda()  # ~256 tokens x top-8 over 32 experts
    act = torch.zeros(kExperts, kMaxRows, kInter, dtype=torch.float8_e4m3fn, device="cuda")
    act_s = empty_act_scales(kMaxRows, kInter // 128, kExperts, device="cuda")
    y = torch.zeros(kExperts, kMaxRows, kHidden, dtype=torch.bfloat16, device="cuda")
    yd = torch.zeros(64, kHidden, dtype=torch.bfloat16, device="cuda")

    def cases(w):
        return {
            "gate-up+SiLU 8/32 x 1": (lambda: K.m_grouped_masked_swiglu(
                x, xs, w["w13"], s13, one, 1, act, act_s), act, 235e6),
            "down 8/32 x 1": (lambda: K.m_grouped_masked(h, hs, w["w2"], s2, one, 1, y), y, 117e6),
            "gate-up+SiLU 32 x 48-80": (lambda: K.m_grouped_masked_swiglu(
                x, xs, w["w13"], s13, spread, 64, act, act_s), act, 940e6),
            "down 32 x 48-80": (lambda: K.m_grouped_masked(h, hs, w["w2"], s2, spread, 64, y), y,
                                470e6),
            "dense 64 x 7168 x 16384": (lambda: K.fp8_gemm_nt(xd, xds, w["wd"][0], sd[0], yd), yd,
                                        117e6),
        }

    graphs, outputs = {}, {}
    for label, weights, defines in (("plain", plain, ()), ("blocked", blocked, kBlocked)):
        K.extra_defines = defines
        for name, (fn, out, nbytes) in cases(weights).items():
            with pdl_scope(True):
                graphs[(name, label)] = graph_replay(fn)
            out.zero_()
            graphs[(name, label)]()
            torch.cuda.synchronize()
            outputs[(name, label)] = out.clone()
    K.extra_defines = ()
    rows = []
    with common.flush_as("clean"):
        for name, (_, _, nbytes) in cases(plain).items():
            same = torch.equal(outputs[(name, "plain")].view(torch.uint8),
                               outputs[(name, "blocked")].view(torch.uint8))
            row = {"case": name, "same_bits": same}
            for rnd in range(1, args.rounds + 1):
                for label in ("plain", "blocked"):
                    row[f"{label}_{rnd}_us"] = common.bench(graphs[(name, label)],
                                                            repeats=args.repeats)
            for label in ("plain", "blocked"):
                best = min(row[f"{label}_{r}_us"] for r in range(1, args.rounds + 1))
                row[f"{label}_TBps"] = nbytes / best / 1e6
            rows.append(row)
            common.print_row(row)
    common.write_results("blocked_b_pair", rows, "weights [E, N, K] (plain) vs K-block-major "
                         "[E, K/128, N, 128] (blocked, MOE_FP8_BLOCKED_B), graphs with PDL, clean "
                         "flush, interleaved rounds; TB/s = weight bytes / best round")
    if not all(r["same_bits"] for r in rows):
        raise SystemExit("the blocked weights changed an output")


if __name__ == "__main__":
    main()

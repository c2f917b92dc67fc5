"""k-grouped FP8 weight-gradient GEMM: ours vs peers in the same process.

``out[e] += dY_e^T X_e`` over each expert's tokens, both operands FP8 with 1x128 scales along
tokens, fp32 out; ``overwrite_*`` columns: ``accumulate=False`` (``out[e] =``, no read of out);
``bf16_out_*``: bf16 out (overwritten; bf16 master weights), beside ``via_fp32_us`` (the fp32
overwrite then ``.to(bf16)``: what a bf16 gradient cost before). Peers, on the same tokens:
cuBLAS blockwise FP8 (1x128 x 1x128, one call per
expert, where this torch build supports it; fp32 out, written: ``overwrite_vs_fp8_peer``
compares our ``accumulate=False`` with it), torch._grouped_mm in bf16 (k-grouped 2-D x 2-D with
offsets), and cuBLAS bf16 one call per expert. Median of CUDA-graph replays, L2 flushed before
each. TFLOPS = 2 * M * N * tokens. Target (TARGETS / issue 7): >= 1100 TFLOPS at 4096 tokens x
7168 x 2048 per expert (published record 878-1092 on H800).
Results: benchmarks/results/wgrad_<date>.{md,csv}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm import bench_graph, graph_replay  # noqa: E402
from common import bench_interleaved, geomean, kernel_us, write_results  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.heuristics import GemmConfig, num_sms, wgrad_config  # noqa: E402
from moe_fp8.gemm.kernels import wgrad as W  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402

kTarget = 1100
# (label, M, N, tokens per expert)
kCases = [("record shape, 4 experts", 7168, 2048, [4096] * 4),
          ("record shape, 8 experts", 7168, 2048, [4096] * 8),
          ("GEMM1 weight, 4 experts", 4096, 7168, [4096] * 4),
          ("32 experts ~512 tok (uneven, 3 empty)", 7168, 2048, None),
          ("32 experts ~512 tok (uneven, 3 empty)", 4096, 7168, None)]
kSweep = [GemmConfig(128, 128, cluster_m=c, double_buffer=d)
          for c, d in ((1, 1), (1, 2), (2, 1), (2, 2), (2, 0))]
# wider tiles: fewer L2 bytes per FLOP (single-buffered: 96 accumulators + 96 partials)
kSweep += [GemmConfig(128, n, cluster_m=c) for n, c in ((192, 2), (192, 1), (160, 2))]


def _quant_tokens(x: torch.Tensor):
    q, s = ref.per_token_group_quant(x)
    s_mn = empty_act_scales(x.shape[0], s.shape[1], device="cuda")
    s_mn.copy_(s)
    return q, s_mn


def _uneven(seed: int):
    gen = torch.Generator().manual_seed(seed)
    counts = (torch.rand(32, generator=gen) * 8).long() * 128  # multiples of 128, mean ~512
    counts[torch.randperm(32, generator=gen)[:3]] = 0
    return counts.tolist()


def wgrad_problem(m: int, n: int, counts):
    """bf16 dY^T [m, T] and X^T [n, T] (random, seeded by the shape), their FP8 operands (1x128
    along tokens) and the offsets of ``counts`` tokens per expert."""
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    tokens = sum(counts)
    x_a = torch.randn(m, tokens, device="cuda", generator=gen).to(torch.bfloat16)
    x_b = torch.randn(n, tokens, device="cuda", generator=gen).to(torch.bfloat16)
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32,
                           device="cuda")
    return x_a, x_b, _quant_tokens(x_a), _quant_tokens(x_b), offsets


def _config_label(c) -> str:
    return f"{c.block_m}x{c.block_n}s{c.stages}c{c.cluster_m}"


def case_rows(label, m, n, counts, repeats, sweep):
    tokens = sum(counts)
    x_a, x_b, (qa, sa), (qb, sb), offsets = wgrad_problem(m, n, counts)
    num_experts = len(counts)
    out = torch.zeros(num_experts, m, n, device="cuda")
    flops = 2 * m * n * tokens
    config = wgrad_config(m, n, num_sms(torch.cuda.current_device()))
    check = torch.zeros_like(out)
    W.k_grouped_tn(qa, sa, qb, sb, offsets, check)
    want = torch.zeros_like(out)
    G.k_grouped_fp8_gemm_tn_contiguous((qa, sa), (qb, sb), offsets, want, backend="reference")
    # accumulate=False (out = the product, zeros for experts without tokens): no read of out
    fresh = torch.full_like(out, float("nan"))
    W.k_grouped_tn(qa, sa, qb, sb, offsets, fresh, accumulate=False)
    half = torch.full_like(out, float("nan"), dtype=torch.bfloat16)
    W.k_grouped_tn(qa, sa, qb, sb, offsets, half, accumulate=False)
    half_diff = G.calc_diff(half.float(), want)
    half_config = wgrad_config(m, n, num_sms(torch.cuda.current_device()), 2)
    nan = float("nan")  # the timed columns, filled after the interleaved timing below
    row = {"case": label, "E": num_experts, "M": m, "N": n, "tokens": tokens,
           "config": _config_label(config),
           "us": nan, "TFLOPS": nan, "diff_vs_ref": G.calc_diff(check, want), "TFLOPS_kernel": nan,
           "overwrite_us": nan, "overwrite_TFLOPS": nan,
           "overwrite_diff_vs_ref": G.calc_diff(fresh, want),
           "bf16_out_config": _config_label(half_config),
           "bf16_out_us": nan, "bf16_out_TFLOPS": nan, "bf16_out_diff_vs_ref": half_diff,
           "via_fp32_us": nan}
    del fresh
    starts = offsets[:-1].tolist()
    segments = [(e, s, c) for e, (s, c) in enumerate(zip(starts, counts)) if c > 0]
    peers = {}
    F = torch.nn.functional
    if hasattr(F, "scaled_mm"):
        bw = F.ScalingType.BlockWise1x128
        nosw = F.SwizzleType.NO_SWIZZLE

        # scale_a [M, c/128] and scale_b [N, c/128], both MN-major as ours are (torch 2.11 refused
        # scale_b transposed: "scale_b must have shape 2048 x 32", sessions 1-23's NaN column)
        # NOTE: the outputs are kept (a list): one discarded per expert let the capture's pool
        # hand every expert the same block, so the peer wrote one 59 MB gradient 29 times, partly
        # into L2, where ours writes 32 distinct ones (sessions 1-26's peer column)
        def cublas_fp8():
            return [F.scaled_mm(qa[:, s:s + c], qb[:, s:s + c].t(), sa[:, s // 128:(s + c) // 128],
                                bw, sb[:, s // 128:(s + c) // 128], bw, swizzle_a=nosw,
                                swizzle_b=nosw, output_dtype=torch.float32)
                    for e, s, c in segments]
        peers["cuBLAS_fp8_1x128_per_expert"] = cublas_fp8
    if hasattr(torch, "_grouped_mm"):
        ends = offsets[1:].clone()
        x_bt = x_b.t()
        peers["grouped_mm_bf16"] = lambda: torch._grouped_mm(x_a, x_bt, offs=ends)

    def bf16_per_expert():  # outputs kept, as above
        return [torch.mm(x_a[:, s:s + c], x_b[:, s:s + c].t()) for e, s, c in segments]
    peers["cuBLAS_bf16_per_expert"] = bf16_per_expert
    runnable = {}
    for name, fn in peers.items():
        row[f"{name}_TFLOPS"] = nan
        try:
            runnable[name] = graph_replay(fn)
        except Exception as error:  # peer unsupported on this build: keep our numbers
            print(f"peer {name} failed: {error!r}"[:300])
    # ours (accumulating, overwriting) and the peers timed in turns (common.bench_interleaved)
    def via_fp32():
        W.k_grouped_tn(qa, sa, qb, sb, offsets, out, accumulate=False)
        half.copy_(out)

    timed = bench_interleaved(
        [graph_replay(lambda: W.k_grouped_tn(qa, sa, qb, sb, offsets, out)),
         graph_replay(lambda: W.k_grouped_tn(qa, sa, qb, sb, offsets, out, accumulate=False)),
         graph_replay(lambda: W.k_grouped_tn(qa, sa, qb, sb, offsets, half, accumulate=False)),
         graph_replay(via_fp32)]
        + list(runnable.values()), repeats=repeats)
    ours, us_store, us_half, us_via = timed[:4]
    timed = timed[4:]
    row.update({"us": ours, "TFLOPS": flops / ours / 1e6,
                "overwrite_us": us_store, "overwrite_TFLOPS": flops / us_store / 1e6,
                "bf16_out_us": us_half, "bf16_out_TFLOPS": flops / us_half / 1e6,
                "via_fp32_us": us_via})
    try:  # the kernel alone (profiler): the convention of the published record (DeepGEMM PR #95)
        row["TFLOPS_kernel"] = flops / kernel_us(
            lambda: W.k_grouped_tn(qa, sa, qb, sb, offsets, out), repeats=repeats) / 1e6
    except RuntimeError as error:
        print(f"kernel_us ({label}): {error}")
    for name, us in zip(runnable, timed):
        row[f"{name}_TFLOPS"] = flops / us / 1e6
    best = max((flops / us / 1e6 for us in timed), default=0.0)
    row["vs_best_peer"] = row["TFLOPS"] / best if best else float("nan")
    # fp32 out overwritten against the FP8 peer, whose output is fp32 written once too (ours also
    # writes the zeros of experts without tokens; the peer skips them)
    fp8_peer = row.get("cuBLAS_fp8_1x128_per_expert_TFLOPS", nan)
    row["overwrite_vs_fp8_peer"] = row["overwrite_TFLOPS"] / fp8_peer if fp8_peer > 0 else nan
    # bf16 out against the bf16 peers (their output is bf16 too)
    best_bf16 = max((flops / us / 1e6 for name, us in zip(runnable, timed) if "bf16" in name),
                    default=0.0)
    row["bf16_out_vs_bf16_peers"] = row["bf16_out_TFLOPS"] / best_bf16 if best_bf16 else nan
    row["target_TFLOPS"] = kTarget
    sweep_rows = []
    for pinned in (kSweep if sweep else []):
        r = pinned.resolved(0, wgrad=True)
        us = bench_graph(lambda: W.k_grouped_tn(qa, sa, qb, sb, offsets, out, r), repeats)
        check.zero_()
        W.k_grouped_tn(qa, sa, qb, sb, offsets, check, r)
        sweep_rows.append({"case": label, "M": m, "N": n, "tokens": tokens,
                           "config": f"{r.block_m}x{r.block_n}s{r.stages}g{r.group_n}"
                                     f"c{r.cluster_m}d{int(r.double_buffer)}",
                           "us": us, "TFLOPS": flops / us / 1e6,
                           "diff_vs_ref": G.calc_diff(check, want)})
    return row, sweep_rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time pinned configs")
    args = parser.parse_args()
    rows, sweep_rows = [], []
    for index, (label, m, n, counts) in enumerate(kCases):
        row, swept = case_rows(label, m, n, counts or _uneven(index), args.repeats, args.sweep)
        rows.append(row)
        sweep_rows += swept
        torch.cuda.empty_cache()
    if sweep_rows:
        write_results("wgrad_sweep", sweep_rows)
    ratio = geomean([r["vs_best_peer"] for r in rows])
    fp8 = geomean([r["overwrite_vs_fp8_peer"] for r in rows])
    write_results("wgrad", rows, f"geomean vs best peer (ours accumulating, the peers writing): "
                  f"{ratio:.3f}; fp32 overwrite vs cuBLAS blockwise FP8 (fp32 out): {fp8:.3f}; "
                  f"target {kTarget} TFLOPS at 4096 tokens x 7168 x 2048 per expert")


if __name__ == "__main__":
    main()

"""Grouped FP8 GEMMs: contiguous (prefill) and masked (decode) layouts, peers in the same process.

Contiguous: ours vs cuBLAS blockwise one call per expert, torch._scaled_grouped_mm (row-wise FP8)
and torch._grouped_mm (bf16), on TARGETS.md's shapes and on uneven 32-expert MoE splits.
Masked: ours on TARGETS.md's shapes and on decode sizes (32 experts x 1..64 tokens), against the
weight-streaming floor (bytes of the touched experts' weights / measured copy bandwidth).
Results: benchmarks/results/grouped_contiguous_<date>, grouped_masked_<date> (.md, .csv).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm import bench_graph, cublas_blockwise, graph_replay  # noqa: E402
from gemm_ab import parse_config  # noqa: E402
from common import bench_interleaved, copy_bandwidth_gbs, geomean, kernel_us, write_results  # noqa: E402

from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.heuristics import contiguous_config, masked_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import build_m_indices, empty_act_scales, segment_offsets  # noqa: E402

# (G, M per expert, N, K): target TFLOPS (TARGETS.md)
kContiguous = {(4, 8192, 4096, 7168): 1420, (4, 8192, 7168, 2048): 1280,
               (8, 4096, 4096, 7168): 1420, (8, 4096, 7168, 2048): 1280}
# (G, M_max, N, K): target TFLOPS
kMasked = {(1, 1024, 4096, 7168): 1320, (1, 1024, 7168, 2048): 970,
           (2, 512, 4096, 7168): 1230, (2, 512, 7168, 2048): 960,
           (4, 256, 4096, 7168): 1130, (4, 256, 7168, 2048): 1000}


def _rand(shape, gen):
    return torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)


def _act(x):
    q, s = ref.per_token_group_quant(x)
    s_mn = empty_act_scales(x.shape[-2], s.shape[-1], x.shape[0] if x.dim() == 3 else None,
                            device="cuda")
    s_mn.copy_(s)
    return q, s_mn


def contiguous_rows(counts, n, k, repeats, label, extra_configs=()):
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    num_experts = len(counts)
    m_indices = build_m_indices(counts, device="cuda")
    m_sum = m_indices.shape[0]
    x, w = _rand((m_sum, k), gen), _rand((num_experts, n, k), gen)
    qa, sa = _act(x)
    qb, sb = ref.per_block_quant(w)
    out = torch.empty(m_sum, n, dtype=torch.bfloat16, device="cuda")
    config = contiguous_config(m_sum, n, k, num_sms(torch.cuda.current_device()))
    flops = 2 * sum(counts) * n * k
    run_ours = graph_replay(
        lambda: K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, out, config))
    # The offsets form of the same op ([E+1] segment starts instead of m_indices [M_sum]).
    offs = segment_offsets(counts).cuda()
    run_offsets = graph_replay(
        lambda: K.m_grouped_contiguous_offsets(qa, sa, qb, sb, offs, out, config))
    nan = float("nan")  # the timed columns, filled after the interleaved timing below
    row = {"case": label, "E": num_experts, "M_sum": m_sum, "N": n, "K": k,
           "config": f"{config.block_m}x{config.block_n}", "us": nan, "TFLOPS": nan,
           "offsets_form_us": nan}
    for text in extra_configs:  # pinned alternatives, same inputs (--contiguous-configs)
        pinned = parse_config(text)
        try:
            us = bench_graph(lambda: K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, out, pinned),
                             repeats)
        except ValueError as error:  # e.g. A multicast where the column blocks do not pair
            print(f"{text}: {error}"[:200])
            us = float("nan")
        row[f"{text}_TFLOPS"] = flops / us / 1e6
    # Peers, on the same tokens (padded segments: cuBLAS gets each expert's real rows).
    starts = offs[:-1].tolist()
    peers = {}
    blockwise = cublas_blockwise()
    if blockwise is not None:
        # cuBLAS wants M-major scales with stride (1, M) exactly and (seen: NOT_SUPPORTED
        # otherwise) M a multiple of 16: it gets each expert's rows rounded up to 16.
        rounded = [(c + 15) // 16 * 16 for c in counts]
        slices = [(qa[s:s + c], torch.empty(k // 128, c, device="cuda").t().copy_(sa[s:s + c]),
                   qb[e], sb[e]) for e, (s, c) in enumerate(zip(starts, rounded)) if c > 0]
        peers["cuBLAS_per_expert"] = lambda: [blockwise(*args) for args in slices]
    ends = offs[1:].to(torch.int32)
    if hasattr(torch, "_scaled_grouped_mm"):
        row_scale_a = torch.rand(m_sum, device="cuda") + 0.5
        row_scale_b = torch.rand(num_experts, n, device="cuda") + 0.5
        peers["scaled_grouped_mm_rowwise"] = lambda: torch._scaled_grouped_mm(
            qa, qb.transpose(-2, -1), row_scale_a, row_scale_b, offs=ends,
            out_dtype=torch.bfloat16)
    if hasattr(torch, "_grouped_mm"):
        peers["grouped_mm_bf16"] = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)
    runnable = {}
    for name, fn in peers.items():
        row[f"{name}_TFLOPS"] = nan
        try:
            runnable[name] = graph_replay(fn)
        except Exception as error:
            print(f"peer {name} failed: {error!r}"[:200])
    # ours, its offsets form and the peers timed in turns (common.bench_interleaved's NOTE)
    timed = bench_interleaved([run_ours, run_offsets] + list(runnable.values()), repeats=repeats)
    ours = timed[0]
    row.update({"us": ours, "TFLOPS": flops / ours / 1e6, "offsets_form_us": timed[1]})
    for name, us in zip(runnable, timed[2:]):
        row[f"{name}_TFLOPS"] = flops / us / 1e6
    best = max((flops / us / 1e6 for us in timed[2:]), default=0.0)
    row["vs_best_peer"] = row["TFLOPS"] / best if best else float("nan")
    return row


def masked_row(num_experts, m_max, counts, n, k, bandwidth, repeats, label, extra_configs=(),
               with_kernel_us=False):
    gen = torch.Generator(device="cuda").manual_seed(m_max + n)
    x, w = _rand((num_experts, m_max, k), gen), _rand((num_experts, n, k), gen)
    qa, sa = _act(x)
    qb, sb = ref.per_block_quant(w)
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    expected_m = max(1, int(sum(counts) / max(1, sum(c > 0 for c in counts))))
    out = torch.empty(num_experts, m_max, n, dtype=torch.bfloat16, device="cuda")
    config = masked_config(num_experts, expected_m, n, k, num_sms(torch.cuda.current_device()))
    us = bench_graph(lambda: K.m_grouped_masked(qa, sa, qb, sb, masked_m, expected_m, out, config),
                     repeats)
    touched = sum(c > 0 for c in counts)
    weight_bytes = touched * (n * k + 4 * (n // 128 + 1) * (k // 128))
    floor_us = weight_bytes / (bandwidth * 1e3)
    flops = 2 * sum(counts) * n * k
    nbytes = weight_bytes + sum(counts) * (k + 2 * n)
    row = {"case": label, "E": num_experts, "M_max": m_max, "N": n, "K": k,
           "expected_m": expected_m, "config": f"{config.block_m}x{config.block_n}", "us": us,
           "TFLOPS": flops / us / 1e6, "GB/s": nbytes / us / 1e3, "floor_us": floor_us,
           "vs_floor": us / floor_us}
    if with_kernel_us:
        # the kernel's own duration (torch.profiler): the convention of the published record that
        # the record shapes' targets come from; graph replays add the launch gap to ``us``
        row["kernel_us"] = kernel_us(
            lambda: K.m_grouped_masked(qa, sa, qb, sb, masked_m, expected_m, out, config),
            repeats=repeats)
        row["TFLOPS_kernel"] = flops / row["kernel_us"] / 1e6
    for text in extra_configs:  # pinned alternatives, same inputs (--masked-configs)
        pinned = parse_config(text)
        row[f"{text}_us"] = bench_graph(
            lambda: K.m_grouped_masked(qa, sa, qb, sb, masked_m, expected_m, out, pinned), repeats)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--masked-configs", default="",
                        help="comma-separated pinned configs also timed on the masked rows "
                             "(record shapes and decode), e.g. 64x256c1d0 (gemm_ab.py's syntax)")
    parser.add_argument("--contiguous-configs", default="",
                        help="comma-separated pinned configs also timed on every contiguous row")
    parser.add_argument("--only", choices=("both", "contiguous", "masked"), default="both")
    args = parser.parse_args()
    extra = [c for c in args.masked_configs.split(",") if c]
    args.extra_contiguous = [c for c in args.contiguous_configs.split(",") if c]
    if args.only != "masked":
        contiguous_table(args)
    if args.only != "contiguous":
        masked_table(args, extra)


def contiguous_table(args):
    rows = []
    for (g, m, n, k), target in kContiguous.items():
        row = contiguous_rows([m] * g, n, k, args.repeats, "record shape", args.extra_contiguous)
        row["target_TFLOPS"] = target
        rows.append(row)
        torch.cuda.empty_cache()
    gen = torch.Generator().manual_seed(0)
    for mean in (128, 512):
        counts = (torch.rand(32, generator=gen) * 2 * mean).long()
        counts[torch.randperm(32, generator=gen)[:3]] = 0  # empty experts
        for n, k in ((4096, 7168), (7168, 2048)):
            row = contiguous_rows(counts.tolist(), n, k, args.repeats, f"32 experts ~{mean} tok",
                                  args.extra_contiguous)
            row["target_TFLOPS"] = float("nan")
            rows.append(row)
            torch.cuda.empty_cache()
    ratio = geomean([r["vs_best_peer"] for r in rows])
    write_results("grouped_contiguous", rows, f"geomean vs best peer: {ratio:.3f}")


def masked_table(args, extra):
    bandwidth = copy_bandwidth_gbs()
    mrows = []
    for (g, m_max, n, k), target in kMasked.items():
        row = masked_row(g, m_max, [m_max] * g, n, k, bandwidth, args.repeats, "record shape",
                         extra, with_kernel_us=True)
        row["target_TFLOPS"] = target
        row["kernel_vs_target"] = row["TFLOPS_kernel"] / target
        mrows.append(row)
    for tokens in (1, 8, 32, 64):
        for n, k in ((4096, 7168), (7168, 2048)):
            counts = [tokens] * 32
            counts[5] = 0
            row = masked_row(32, 128, counts, n, k, bandwidth, args.repeats, f"decode 32x{tokens}",
                             extra)
            row["target_TFLOPS"] = float("nan")
            mrows.append(row)
    for n, k in ((4096, 7168), (7168, 2048)):  # the layer's one-token step: 8 of 32 experts
        row = masked_row(32, 128, [1] * 8 + [0] * 24, n, k, bandwidth, args.repeats,
                         "decode 8 of 32 x1", extra)
        row["target_TFLOPS"] = float("nan")
        mrows.append(row)
    write_results("grouped_masked", mrows, f"copy bandwidth {bandwidth:.0f} GB/s; floor = touched "
                  "experts' weight bytes / copy bandwidth; decode target vs_floor <= 1.15")


if __name__ == "__main__":
    main()

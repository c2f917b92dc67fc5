"""Dense FP8 GEMM: ours vs cuBLAS blockwise (1x128 activations, 128x128 weights), same process.

Every shape of TARGETS.md's dense table; median device time with the L2 flushed before each
repeat; TFLOPS = 2MNK / t; GB/s counts A, B, their scales and D once. ``kernel_us`` and
``cuBLAS_kernel_us``: the kernels' own durations (torch.profiler, no launch gaps), the convention
of DeepGEMM's and the record's published figures (TARGETS.md) — compare targets with
``TFLOPS_kernel``. Also checks that both
products agree (calc_diff). ``--sweep`` additionally times pinned configurations on a few shapes
(the data behind heuristics.py). ``--baseline DIR`` also times an earlier kernel version whose
headers were copied to DIR (``git show <commit>:moe_fp8/gemm/include/<file>``; the v2 kernel
signature) on the M = 4096 shapes, in the same process, so a version change is measured against
run-to-run spread. Results: benchmarks/results/gemm_<date>.{md,csv}.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, bench_interleaved, card, geomean, kernel_us, write_results  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm import jit  # noqa: E402
from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm import heuristics as H  # noqa: E402
from moe_fp8.gemm.heuristics import GemmConfig, dense_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402

# (M, N, K): cuBLAS blockwise, DeepGEMM Apr 2025, target (TARGETS.md, H100 / H800 record + 5 %)
kShapes = {
    (64, 2112, 7168): (75, 155, 220), (64, 24576, 1536): (184, 231, 300),
    (64, 32768, 512): (137, 184, 230), (64, 7168, 16384): (248, 285, 350),
    (64, 4096, 7168): (131, 206, 300), (64, 7168, 2048): (132, 195, 310),
    (128, 2112, 7168): (148, 283, 370), (128, 24576, 1536): (378, 433, 560),
    (128, 32768, 512): (269, 330, 375), (128, 7168, 16384): (483, 529, 680),
    (128, 4096, 7168): (259, 370, 560), (128, 7168, 2048): (254, 341, 535),
    (4096, 2112, 7168): (1053, 1109, 1180), (4096, 24576, 1536): (1035, 1191, 1270),
    (4096, 32768, 512): (801, 761, 850), (4096, 7168, 16384): (1110, 1461, 1550),
    (4096, 4096, 7168): (1166, 1385, 1450), (4096, 7168, 2048): (1109, 1147, 1230),
}

def _mc2():  # the 128 x 128 tile without and with B multicast, promotion overlapped
    return [GemmConfig(128, 128, cluster_m=c) for c in (1, 2)]


# 256-wide tiles alone, with B multicast and with A multicast: each cuts the L2 reads per MMA
# (128 x 128: 32 KB per 2 M MACs; 128 x 256: 48 KB per 4 M; + B multicast: 32 KB per 4 M), and
# ncu showed the 128 x 128 mainloop L2-bound (H100, 2026-12-05: L2 82 % busy, tensor pipe 78 %
# of active cycles, math warps waiting on full slots).
kWide = [GemmConfig(128, 256), GemmConfig(128, 256, cluster_m=2), GemmConfig(128, 256, cluster_n=2)]


kSweep = {
    (64, 2112, 7168): [GemmConfig(64, n) for n in (16, 32)],
    # one wave of tiles (128 of 132 SMs) instead of 1.5-3 waves: the odd-width penalty re-measured
    (64, 24576, 1536): [GemmConfig(64, 192), GemmConfig(64, 96)],
    (64, 32768, 512): [GemmConfig(64, 256)],
    (128, 32768, 512): [GemmConfig(128, 256)],
    (128, 4096, 7168): [GemmConfig(128, 32), GemmConfig(64, 64)],
    # 4096 rows: 128 x 128 with and without B multicast, then the 256-wide tiles (kWide); the
    # odd widths 144-192 were timed on 2026-12-05 (results/gemm_sweep_2026-12-05.md)
    (4096, 2112, 7168): _mc2() + kWide,
    (4096, 24576, 1536): _mc2() + kWide,
    (4096, 32768, 512): _mc2() + kWide,
    (4096, 7168, 16384): _mc2() + kWide,
    (4096, 4096, 7168): _mc2() + kWide,
    (4096, 7168, 2048): _mc2() + kWide,
}


def a_multicast_variants(config: GemmConfig, n: int) -> list:
    """The heuristic's tile with A multicast across a 2-CTA cluster (cluster_n = 2), where its
    column blocks pair up. Aimed at small M, where every CTA otherwise reads all of A from L2 for
    a narrow column block (64 x 2112 x 7168, 64 x 16 tiles: 8 KB of A per 2 KB of B per K block)."""
    paired = H.with_a_multicast(dataclasses.replace(config, stages=0), n)
    if paired is None:
        return []
    paired = [paired]
    if config.block_m == 64 and config.double_buffer:
        # a 64-row tile in a cluster runs single-buffered: time that without multicast too,
        # so the pair isolates the multicast
        paired.insert(0, dataclasses.replace(config, double_buffer=False))
    return paired


def split_k_variants(m: int, n: int, k: int, sms: int) -> list:
    """Split-K candidates for small M (include/split_k.cuh): 64-, 128- and 256-wide tiles, each
    with the most K slices that fit one wave."""
    if m > 256:
        return []
    found = [H.split_k_config(m, n, k, sms, block_n) for block_n in (64, 128, 256)]
    return [c for c in found if c is not None]


def _kernel_ratio(heuristic_kernel_us: float, fn, repeats: int) -> float:
    """The heuristic's kernel-only time over ``fn``'s (nan when either cannot be measured)."""
    try:
        return heuristic_kernel_us / kernel_us(fn, repeats=repeats)
    except RuntimeError:
        return float("nan")


def _v2_smem(block_m, block_n, stages, k):
    """Shared memory of the v2 kernel (its SmemLayout): ring, bf16 tile, per-warpgroup sb."""
    ring = stages * (block_m * 128 + block_n * 128 + block_m * 4)
    end = (ring + block_m * block_n * 2 + block_m // 64 * 2 * (k // 128) * 4 + 7) // 8 * 8
    return end + 2 * stages * 8 + 1024


def baseline_v2(header_dir, m, n, k, qa, sa, qb, sb, out):
    """A launcher of the v2 kernel (headers copied to ``header_dir``) on the dense layout, with
    v2's choice for these shapes (128 x 128, the deepest ring that fits, no multicast)."""
    stages = max(s for s in range(2, 11) if _v2_smem(128, 128, s, k) <= 232448)
    src = jit.KernelSource(os.path.join(os.path.abspath(header_dir), "fp8_gemm.cuh"),
                           f"moe_fp8::fp8_gemm_kernel<{n}, {k}, 128, 128, {stages}, 16, 0, 1>")
    kernel = jit.get_kernel(src)
    sa2 = sa.t()
    args = [K._tma(qa, 128, 128, 128), K._tma(qb, 128, 128, 128),
            K._tma(sa2, 128, 1, 0, m, sa2.shape[0], sa2.stride(0)), K._tma(out, 16, 64, 32),
            jit.i32(m), jit.i32(1), sb, sb, out]
    grid = min(num_sms(torch.cuda.current_device()), -(-m // 128) * -(-n // 128))
    smem = _v2_smem(128, 128, stages, k)
    return lambda: kernel.launch((grid, 1, 1), (384, 1, 1), smem, args)


def graph_replay(fn):
    """``fn`` warmed up (also on a side stream) and captured in a CUDA graph -> a callable that
    replays it (and keeps ``fn``, with what it closes over, alive)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay(graph=graph, fn=fn):
        # NOTE: holds fn, so the tensors it closes over outlive the graph that reads them: a later
        # capture's empty_cache() would otherwise hand their freed blocks back to the driver
        # (flush_probe built all graphs first and faulted on the first replay)
        graph.replay()
    return replay


def bench_graph(fn, repeats: int) -> float:
    """Median device time of ``fn`` captured in a CUDA graph (replays; L2 flushed before each).

    NOTE: timing eager calls measured host launch overhead for the small shapes (a ~50 us floor
    in the first run): the L2 flush gives the host only ~85 us of slack before the timed region.
    """
    return bench(graph_replay(fn), repeats=repeats)


def make_inputs(m, n, k, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=gen).to(torch.bfloat16)
    qa, s = ref.per_token_group_quant(x)
    sa = empty_act_scales(m, k // 128, device="cuda")
    sa.copy_(s)
    qb, sb = ref.per_block_quant(w)
    return qa, sa, qb, sb


def cublas_blockwise():
    """A callable (qa, sa, qb, sb) -> bf16 through cuBLAS blockwise scaling, or None."""
    F = torch.nn.functional
    if not hasattr(F, "scaled_mm"):
        return None
    scaling, swizzle = F.ScalingType, F.SwizzleType

    def run(qa, sa, qb, sb):
        # sa: [M, K/128] M-major; sb: [K/128, ceil(N/128)] K-major (DEVICE_FACTS.md)
        return F.scaled_mm(qa, qb.t(), sa, scaling.BlockWise1x128, sb.t(),
                           scaling.BlockWise128x128, swizzle_a=swizzle.NO_SWIZZLE,
                           swizzle_b=swizzle.NO_SWIZZLE, output_dtype=torch.bfloat16)
    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time pinned configs")
    parser.add_argument("--sweep-m", default="", help="sweep only these M (comma-separated)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--baseline", default="", help="dir with the v2 headers (see docstring)")
    parser.add_argument("--only-m", default="", help="time only the shapes with these M (comma-separated)")
    args = parser.parse_args()
    peer = cublas_blockwise()
    sms = num_sms(torch.cuda.current_device())
    rows, ratios, sweep_rows = [], [], []
    only_m = {int(v) for v in args.only_m.split(",") if v}
    for (m, n, k), (cublas_ref, deepgemm_ref, target) in kShapes.items():
        if only_m and m not in only_m:
            continue
        qa, sa, qb, sb = make_inputs(m, n, k)
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        config = dense_config(m, n, k, sms)
        run_ours = graph_replay(lambda: K.fp8_gemm_nt(qa, sa, qb, sb, out, config))
        theirs_out, run_peer = None, None
        if peer is not None:
            try:  # timed in turns with ours (bench_interleaved's NOTE)
                theirs_out = peer(qa, sa, qb, sb)
                run_peer = graph_replay(lambda: peer(qa, sa, qb, sb))
            except Exception as error:  # peer unavailable on this build: keep our numbers
                peer_error = error
        timed = bench_interleaved([run_ours] + ([run_peer] if run_peer else []),
                                  repeats=args.repeats)
        ours = timed[0]
        eager = bench(lambda: K.fp8_gemm_nt(qa, sa, qb, sb, out, config), repeats=args.repeats)
        flops = 2 * m * n * k
        nbytes = m * k + n * k + 2 * m * n + 4 * (m + n) * k // 128
        row = {"M": m, "N": n, "K": k,
               "config": f"{config.block_m}x{config.block_n}s{config.stages}c{config.cluster_m}",
               "us": ours, "TFLOPS": flops / ours / 1e6, "GB/s": nbytes / ours / 1e3,
               "eager_us": eager}
        try:  # the kernels alone (profiler): what the published figures count
            ours_kernel = kernel_us(lambda: K.fp8_gemm_nt(qa, sa, qb, sb, out, config),
                                    repeats=args.repeats)
        except RuntimeError as error:
            print(f"kernel_us ({m}, {n}, {k}): {error}")
            ours_kernel = float("nan")
        row.update({"kernel_us": ours_kernel, "TFLOPS_kernel": flops / ours_kernel / 1e6})
        if run_peer is not None:
            theirs = timed[1]
            try:
                theirs_kernel = kernel_us(lambda: peer(qa, sa, qb, sb), repeats=args.repeats)
            except RuntimeError:
                theirs_kernel = float("nan")
            row.update({"cuBLAS_us": theirs, "cuBLAS_TFLOPS": flops / theirs / 1e6,
                        "cuBLAS_kernel_us": theirs_kernel,
                        "ratio": theirs / ours,
                        "diff_vs_cuBLAS": G.calc_diff(out, theirs_out)})
            ratios.append(theirs / ours)
        elif peer is not None:
            row.update({"cuBLAS_us": float("nan"), "cuBLAS_TFLOPS": float("nan"),
                        "ratio": float("nan"), "diff_vs_cuBLAS": repr(peer_error)[:40]})
        if args.baseline and m >= 1024:
            v2_out = torch.empty_like(out)
            v2 = baseline_v2(args.baseline, m, n, k, qa, sa, qb, sb, v2_out)
            us_v2 = bench_graph(v2, args.repeats)
            row.update({"v2_TFLOPS": flops / us_v2 / 1e6, "v3_over_v2": us_v2 / ours,
                        "diff_vs_v2": G.calc_diff(out, v2_out)})
        elif args.baseline:
            row.update({"v2_TFLOPS": float("nan"), "v3_over_v2": float("nan"),
                        "diff_vs_v2": float("nan")})
        row.update({"target_TFLOPS": target, "vs_target": row["TFLOPS"] / target,
                    "kernel_vs_target": row["TFLOPS_kernel"] / target,
                    "DeepGEMM_H100": deepgemm_ref})
        rows.append(row)
        sweep_m = {int(v) for v in args.sweep_m.split(",") if v}
        if args.sweep and (not sweep_m or m in sweep_m):
            ref_out = out.clone()
            for pinned in (kSweep.get((m, n, k), []) + a_multicast_variants(config, n)
                           + split_k_variants(m, n, k, sms)):
                if pinned.cluster_n > 1 and not H.pairs_columns(pinned, n):
                    continue  # A multicast needs paired column blocks
                us = bench_graph(lambda: K.fp8_gemm_nt(qa, sa, qb, sb, out, pinned), args.repeats)
                r = pinned.resolved(k)
                sweep_rows.append({"M": m, "N": n, "K": k,
                                   "config": f"{r.block_m}x{r.block_n}s{r.stages}g{r.group_n}"
                                             f"c{r.cluster_m}n{r.cluster_n}d{int(r.double_buffer)}"
                                             + (f"k{r.split_k}" if r.split_k > 1 else ""),
                                   "us": us, "TFLOPS": flops / us / 1e6,
                                   "speedup_vs_heuristic": ours / us,
                                   "kernel_speedup_vs_heuristic": _kernel_ratio(
                                       row["kernel_us"], lambda: K.fp8_gemm_nt(
                                           qa, sa, qb, sb, out, pinned), args.repeats),
                                   "diff_vs_heuristic": G.calc_diff(out, ref_out)})
        qa = sa = qb = sb = out = None  # free before the next shape (a del confuses pyflakes)
        torch.cuda.empty_cache()
    summary = (f"{card()}, {sms} SMs. Geometric mean ratio (cuBLAS time / ours): "
               f"{geomean(ratios):.3f} over {len(ratios)} shapes; shapes at/above target: "
               f"{sum(r['vs_target'] >= 1 for r in rows)}/{len(rows)}.")
    if sweep_rows:
        write_results("gemm_sweep", sweep_rows)
    write_results("gemm", rows, summary)
    print(summary)


if __name__ == "__main__":
    main()

"""Work per clock and per watt: ours vs cuBLAS blockwise on compute-bound FP8 GEMMs (GPU only).

The H100s lent here run these GEMMs at their 700 W software power cap (SM clock median 1.35-1.5
GHz of 1.98, session 14), and one card measured our contiguous GEMM 17 % below another with the
same SASS while cuBLAS moved 3 %. Is ours slower per clock, or does it draw the cap at a lower
clock? For each case and kernel: back-to-back calls for ``--seconds`` (no L2 flush: the steady
state a long prefill sees) while nvidia-smi samples every 50 ms; prints the time per call,
TFLOPS, the median SM clock and power over the loop, TFLOPS per GHz (work per clock) and TFLOPS
per 100 W, the share of samples under the power cap. Interleaved: ours, cuBLAS, ours, cuBLAS.

    python benchmarks/power_probe.py [--seconds 3] [--rounds 2] [--configs 128x256c1d1,128x256c2d1]
        [--cases dense,contiguous]

``--variant name=folder`` (repeatable): ours also built from that copy of the include tree
(gemm_ab syntax; e.g. benchmarks/ab_variants.py's ablations), under each pinned config (the
shipped config where none is pinned; ``noload`` needs a cluster_m = 1 config). An
ablation's TFLOPS at the cap bounds what removing that part's energy could buy.

``--configs``: ours also under each pinned config (gemm_ab syntax; a config a case rejects is
skipped). Session 15's question: does B multicast (c2: two row blocks share one load of the
weight tile, a third fewer L2-to-SM bytes per MMA at 128 x 256) buy TFLOPS at the power cap?
The dense 32768 x 4096 x 7168 case is the contiguous 4 x 8192 case's work with one weight tensor,
where the dense kernel can pair row blocks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_gemm import cublas_blockwise  # noqa: E402
from bench_grouped import _act, _rand  # noqa: E402
from gemm_ab import kernels_from, parse_config  # noqa: E402

from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import build_m_indices, segment_offsets  # noqa: E402

kPowerCap = "0x0000000000000004"  # clocks_event_reasons: software power cap


def sample_loop(fn, seconds: float) -> dict:
    """``fn`` back to back for ``seconds`` under nvidia-smi sampling -> time per call (us), SM
    clock and power medians, the share of samples at the power cap."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, int(seconds * 1e3 / max(start.elapsed_time(end), 1e-3)))
    with common.smi_samples("clocks.sm,power.draw,clocks_event_reasons.active", 50) as rows:
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
    clocks, power = common.numbers(rows, 0), common.numbers(rows, 1)
    capped = sum(len(r) > 2 and r[2] == kPowerCap for r in rows)
    return {"us": start.elapsed_time(end) * 1e3 / calls, "calls": calls,
            "sm_mhz": statistics.median(clocks) if clocks else float("nan"),
            "watts": statistics.median(power) if power else float("nan"),
            "capped": capped / max(len(rows), 1)}


kDenseShapes = ((32768, 4096, 7168), (4096, 7168, 16384), (4096, 4096, 7168))


def cases(kinds, dense_shapes=kDenseShapes):
    """(label, flops, ours(config), cuBLAS or None): the contiguous record shapes (cuBLAS one call
    per expert, as bench_grouped's peer) and dense shapes (M = 4096, and the contiguous 4 x 8192
    x 4096 x 7168 work as one dense GEMM). ``ours(None)`` runs the shipped heuristic."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    blockwise = cublas_blockwise()
    for experts, rows, n, k in ((4, 8192, 4096, 7168), (4, 8192, 7168, 2048)):
        if "contiguous" not in kinds:
            break
        counts = [rows] * experts
        m_indices = build_m_indices(counts, device="cuda")
        m_sum = m_indices.numel()
        qa, sa = _act(_rand((m_sum, k), gen))
        qb, sb = ref.per_block_quant(_rand((experts, n, k), gen))
        out = torch.empty(m_sum, n, dtype=torch.bfloat16, device="cuda")
        starts = segment_offsets(counts)[:-1].tolist()
        slices = [(qa[s:s + rows], torch.empty(k // 128, rows, device="cuda").t().copy_(sa[s:s + rows]),
                   qb[e], sb[e]) for e, s in enumerate(starts)]
        yield (f"contiguous {experts}x{rows} N{n} K{k}", 2 * m_sum * n * k,
               lambda config, qa=qa, sa=sa, qb=qb, sb=sb, m=m_indices, o=out:
                   K.m_grouped_contiguous(qa, sa, qb, sb, m, o, config),
               None if blockwise is None else (lambda sl=slices: [blockwise(*a) for a in sl]))
    for m, n, k in dense_shapes:
        if "dense" not in kinds:
            break
        qa, sa = _act(_rand((m, k), gen))
        qb, sb = ref.per_block_quant(_rand((n, k), gen))
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        sa_cublas = torch.empty(k // 128, m, device="cuda").t().copy_(sa)
        yield (f"dense {m}x{n}x{k}", 2 * m * n * k,
               lambda config, qa=qa, sa=sa, qb=qb, sb=sb, o=out: K.fp8_gemm_nt(qa, sa, qb, sb, o, config),
               None if blockwise is None else
               (lambda qa=qa, s=sa_cublas, qb=qb, sb=sb: blockwise(qa, s, qb, sb)))


def _in(folder, ours, config):
    with kernels_from(folder):
        ours(config)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="", help="comma-separated pinned configs for ours")
    parser.add_argument("--cases", default="contiguous,dense")
    parser.add_argument("--dense-shapes", default="", help="M,N,K;M,N,K (default: kDenseShapes)")
    parser.add_argument("--variant", action="append", default=[], help="name=include folder")
    args = parser.parse_args()
    dense_shapes = (tuple(tuple(int(v) for v in shape.split(",")) for shape in
                          args.dense_shapes.split(";")) if args.dense_shapes else kDenseShapes)
    pinned = [(text, parse_config(text)) for text in args.configs.split(",") if text]
    rows = []
    for label, flops, ours, peer in cases(args.cases.split(","), dense_shapes):
        kernels = [("ours", lambda ours=ours: ours(None))]
        variants = [(None, None)] + [tuple(v.split("=", 1)) for v in args.variant]
        for vname, folder in variants:
            # a variant runs under the pinned configs only (the shipped one where none is pinned)
            for text, config in pinned if vname is None or pinned else [("", None)]:
                name = " ".join(x for x in ("ours", vname, text) if x)
                fn = (lambda ours=ours, config=config: ours(config)) if folder is None else \
                    (lambda ours=ours, config=config, folder=folder: _in(folder, ours, config))
                try:
                    fn()
                except ValueError as error:  # e.g. B multicast on the contiguous layout
                    print(f"{label} {name}: {error}"[:200])
                    continue
                kernels.append((name, fn))
        kernels.append(("cuBLAS", peer))
        for rnd in range(1, args.rounds + 1):
            for name, fn in kernels:
                if fn is None:
                    continue
                s = sample_loop(fn, args.seconds)
                tflops = flops / s["us"] / 1e6
                row = {"case": label, "kernel": name, "round": rnd, "us": s["us"], "TFLOPS": tflops,
                       "sm_MHz": s["sm_mhz"], "W": s["watts"], "capped": s["capped"],
                       "TFLOPS_per_GHz": tflops / (s["sm_mhz"] / 1e3),
                       "TFLOPS_per_100W": tflops / (s["watts"] / 100.0)}
                rows.append(row)
                common.print_row(row)
    common.write_results("power_probe", rows, "back-to-back calls (no flush) under nvidia-smi "
                         "sampling every 50 ms; medians of the SM clock and power over each loop; "
                         "capped: share of samples with the software power cap active")


if __name__ == "__main__":
    main()

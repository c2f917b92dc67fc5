"""Pinned GEMM configs against each other on the dense, contiguous and masked layouts, in
interleaved rounds (config A, B, ..., then again), so a power-capped card's clock drift falls on
every config alike. Same inputs for every config of a case; the output bits are compared with the
first config's.

    python benchmarks/experiments/layout_rounds.py --configs 128x256c2d0,128x256c2d1 \
        [--case dense:4096,7168,2048 --case contiguous:4x8192,7168,2048 \
         --case masked:1x1024,4096,7168] [--rounds 5] [--repeats 10]

A case is LAYOUT:SHAPE,N,K with SHAPE = M (dense) or GxM (G experts of M rows each; contiguous:
segments, masked: M_max = masked_m). Config syntax as gemm_ab.py's; `auto` = the heuristic. The
contiguous layout takes the multicast pairs only where the config asks (c2). Prints a markdown
table: median us over rounds, TFLOPS, the round values, and whether the bits equal the first's.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemm import bench_graph, make_inputs  # noqa: E402
from bench_grouped import _act, _rand  # noqa: E402
from common import card  # noqa: E402
from gemm_ab import parse_config  # noqa: E402

from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.heuristics import (contiguous_config, dense_config, masked_config,  # noqa: E402
                                     num_sms)
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.layout import build_m_indices  # noqa: E402

kDefaultCases = ("dense:4096,7168,2048", "dense:4096,4096,7168", "contiguous:4x8192,7168,2048",
                 "contiguous:8x4096,4096,7168", "masked:2x512,4096,7168")


def _grouped_inputs(rows: int, experts: int, n: int, k: int, masked: bool):
    gen = torch.Generator(device="cuda").manual_seed(rows + n + k)
    qa, sa = _act(_rand((experts, rows, k) if masked else (experts * rows, k), gen))
    qb, sb = ref.per_block_quant(_rand((experts, n, k), gen))
    return qa, sa, qb, sb


def case_runner(text: str, sms: int):
    """(label, flops, run(config_text) -> (fn, out)) for one --case."""
    layout, dims = text.split(":", 1)
    shape, n, k = dims.split(",")
    n, k = int(n), int(k)
    if layout == "dense":
        m = int(shape)
        qa, sa, qb, sb = make_inputs(m, n, k)
        out_shape, flops = (m, n), 2 * m * n * k

        def make(config_text):
            c = dense_config(m, n, k, sms) if config_text == "auto" else parse_config(config_text)
            out = torch.full(out_shape, float("nan"), dtype=torch.bfloat16, device="cuda")
            return (lambda: K.fp8_gemm_nt(qa, sa, qb, sb, out, c)), out
        return text, flops, make
    experts, rows = (int(v) for v in shape.split("x"))
    masked = layout == "masked"
    if layout not in ("masked", "contiguous"):
        raise ValueError(f"--case {text!r}: layout must be dense, contiguous or masked")
    qa, sa, qb, sb = _grouped_inputs(rows, experts, n, k, masked)
    flops = 2 * experts * rows * n * k
    if masked:
        masked_m = torch.full((experts,), rows, dtype=torch.int32, device="cuda")

        def make(config_text):
            c = (masked_config(experts, rows, n, k, sms) if config_text == "auto"
                 else parse_config(config_text))
            out = torch.full((experts, rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            return (lambda: K.m_grouped_masked(qa, sa, qb, sb, masked_m, rows, out, c)), out
        return text, flops, make
    m_indices = build_m_indices([rows] * experts, device="cuda")

    def make(config_text):
        c = (contiguous_config(experts * rows, n, k, sms) if config_text == "auto"
             else parse_config(config_text))
        out = torch.full((experts * rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        return (lambda: K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, out, c)), out
    return text, flops, make


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True, help="comma-separated, gemm_ab.py syntax")
    parser.add_argument("--case", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    sms = num_sms(torch.cuda.current_device())
    print(f"# layout_rounds · {card()} · {args.rounds} interleaved rounds of {args.repeats} "
          "L2-flushed graph replays (median of rounds)\n")
    print("| case | config | us | TFLOPS | vs first | rounds (us) | bits vs first |")
    print("|---|---|---|---|---|---|---|")
    for text in args.case or kDefaultCases:
        label, flops, make = case_runner(text, sms)
        runs = {c: make(c) for c in configs}
        for fn, _ in runs.values():
            fn()
        torch.cuda.synchronize()
        times = {c: [] for c in configs}
        for _ in range(args.rounds):
            for c in configs:
                times[c].append(bench_graph(runs[c][0], args.repeats))
        first_out = runs[configs[0]][1]
        first_us = statistics.median(times[configs[0]])
        for c in configs:
            us = statistics.median(times[c])
            same = torch.equal(runs[c][1].view(torch.int16), first_out.view(torch.int16))
            print(f"| {label} | {c} | {us:.1f} | {flops / us / 1e6:.0f} | {first_us / us:.3f} | "
                  f"{'/'.join(f'{t:.1f}' for t in times[c])} | {'same' if same else 'DIFFER'} |")
        del runs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Does the timing protocol decide the large-M figures? Ours and cuBLAS blockwise in short bursts
after the card idled vs sustained (GPU only).

TARGETS.md's DeepGEMM column (its own test harness: a few dozen flushed calls per shape) sits
~1.2x above ours on every large-M shape, while ncu at a fixed clock puts ours level with cuBLAS
per clock (session 20) and the card runs these GEMMs at its 700 W cap (~1.3-1.45 GHz). A burst
right after idling runs before the power limiter has pulled the clock down. For each shape and
kernel, interleaved: ``--idle`` s of sleep, then ``--burst`` calls each after a 256 MiB flush
(``zero_``), each timed alone with CUDA events, under nvidia-smi sampling every 20 ms; then
``--sustain`` more calls the same way. Prints the median time and TFLOPS of the burst's first
ten calls, of the whole burst and of the sustained tail, with the SM clock medians.

    python benchmarks/experiments/burst_probe.py [--idle 3] [--burst 30] [--sustain 300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from bench_gemm import cublas_blockwise, make_inputs  # noqa: E402

from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402

kShapes = ((4096, 7168, 16384), (4096, 4096, 7168), (4096, 24576, 1536), (4096, 7168, 2048))


def timed_calls(fn, calls: int):
    """``calls`` calls, each after an L2 flush, each timed alone -> (us per call, SM MHz
    samples)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(calls)]
    with common.smi_samples("clocks.sm", 20) as rows:
        for start, end in events:
            common.flush_l2("write")
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in events], common.numbers(rows, 0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--burst", type=int, default=30)
    parser.add_argument("--sustain", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    blockwise = cublas_blockwise()
    rows = []
    for m, n, k in kShapes:
        qa, sa, qb, sb = make_inputs(m, n, k)
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        sa_cublas = torch.empty(k // 128, m, device="cuda").t().copy_(sa)
        kernels = [("ours", lambda: K.fp8_gemm_nt(qa, sa, qb, sb, out)),
                   ("cuBLAS", lambda: blockwise(qa, sa_cublas, qb, sb))]
        for _, fn in kernels:  # compile, descriptors, cuBLAS heuristics
            fn()
        torch.cuda.synchronize()
        flops = 2 * m * n * k
        for rnd in range(1, args.rounds + 1):
            for name, fn in kernels:
                time.sleep(args.idle)
                burst, burst_mhz = timed_calls(fn, args.burst)
                tail, tail_mhz = timed_calls(fn, args.sustain)
                first = statistics.median(burst[:10])
                row = {"shape": f"{m}x{n}x{k}", "kernel": name, "round": rnd,
                       "first10_us": first, "first10_TFLOPS": flops / first / 1e6,
                       "burst_us": statistics.median(burst),
                       "burst_TFLOPS": flops / statistics.median(burst) / 1e6,
                       "burst_MHz": statistics.median(burst_mhz) if burst_mhz else float("nan"),
                       "sustained_us": statistics.median(tail[-30:]),
                       "sustained_TFLOPS": flops / statistics.median(tail[-30:]) / 1e6,
                       "sustained_MHz": (statistics.median(tail_mhz[-10:]) if tail_mhz
                                         else float("nan"))}
                rows.append(row)
                common.print_row(row)
    common.write_results("burst_probe", rows, f"each call after a 256 MiB flush, timed alone; "
                         f"burst = {args.burst} calls after {args.idle} s idle, sustained = the "
                         f"last 30 of {args.sustain} more; SM clock from nvidia-smi every 20 ms")


if __name__ == "__main__":
    main()

"""A/B timing of dense FP8 GEMM kernel versions: copies of the include tree, same process, same
inputs, interleaved rounds (ABAB...) so clock and thermal drift fall on every version alike.

    python benchmarks/gemm_ab.py --variant head=.variants/head --variant new=moe_fp8/gemm/include \
        --config 128x128c1d1 --config 128x128c2d0 [--shape 4096,4096,7168 ...]

A version is a folder holding ``fp8_gemm.cuh`` and the headers it includes (e.g.
``git archive <commit> moe_fp8/gemm/include``); the template signature must match today's
``kernels/fp8_gemm.py``. Each (version, config) is timed in ``--rounds`` rounds of
``--repeats`` L2-flushed graph replays; the table gives the median over rounds, the spread
(max - min of the round medians) and the output's difference against the first version.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm import bench_graph, make_inputs  # noqa: E402
from common import card  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm import jit  # noqa: E402
from moe_fp8.gemm.heuristics import GemmConfig, dense_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402

kDefaultShapes = ((4096, 4096, 7168), (4096, 7168, 2048), (4096, 24576, 1536), (4096, 2112, 7168))
kConfig = re.compile(r"(\d+)x(\d+)(?:s(\d+))?c(\d)d(\d)(?:a(\d))?(?:r(\d+))?(?:g(\d+))?(?:n(\d+))?")


def parse_config(text: str) -> GemmConfig:
    """``128x128c1d1`` = block 128 x 128, cluster 1 (B multicast: c2), double buffer 1;
    optional s<stages>, a<cluster_n> (A multicast: a2), r<a_row_chunk> (masked: A rows by need,
    r16), g<group_n>, n<num_sms>; ``auto`` = the shipped heuristic."""
    m = kConfig.fullmatch(text)
    if m is None:
        raise ValueError(f"--config {text!r}: expected e.g. 128x128c1d1, 64x128c1d1a2 or "
                         "128x144s4c2d0g8n128")
    bm, bn, st, c, d, a, r, g, n = m.groups()
    return GemmConfig(int(bm), int(bn), stages=int(st or 0), cluster_m=int(c), double_buffer=int(d),
                      cluster_n=int(a or 1), a_row_chunk=int(r or 0), group_n=int(g or 16),
                      num_sms=int(n or 0))


@contextlib.contextmanager
def kernels_from(folder: str):
    """Route the dense launcher's kernel lookups to the headers in ``folder`` while active (each
    instance from its own header there: fp8_gemm.cuh, or split_k.cuh for split-K configs)."""
    root = os.path.abspath(folder)
    original = K._get_kernel

    def get(n, k, config, layout, device):
        source = K.kernel_source(n, k, config, layout)
        src = jit.KernelSource(os.path.join(root, source.header), source.instance, source.defines)
        return jit.get_kernel(src, device)

    K._get_kernel = get
    try:
        yield
    finally:
        K._get_kernel = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", action="append", required=True, help="name=folder")
    parser.add_argument("--config", action="append", default=None, help="e.g. 128x128c1d1, auto")
    parser.add_argument("--shape", action="append", default=None, help="M,N,K")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    variants = [v.split("=", 1) for v in args.variant]
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else kDefaultShapes
    configs = args.config or ["auto"]
    sms = num_sms(torch.cuda.current_device())
    print(f"# gemm_ab · {card()}")
    print("| M | N | K | config | version | us | TFLOPS | spread % | diff vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, n, k in shapes:
        qa, sa, qb, sb = make_inputs(m, n, k)
        for text in configs:
            config = dense_config(m, n, k, sms) if text == "auto" else parse_config(text)
            outs, times = {}, {name: [] for name, _ in variants}
            graphs, runnable = {}, []
            for name, folder in variants:
                out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                try:
                    _call(folder, qa, sa, qb, sb, out, config)
                    torch.cuda.synchronize()
                except Exception as exc:  # e.g. a config an older version cannot build
                    print(f"| {m} | {n} | {k} | {text} | {name} | n/a: {type(exc).__name__} |")
                    continue
                runnable.append((name, folder))
                outs[name] = out.clone()
                graphs[name] = lambda o=out, c=config, f=folder: _call(f, qa, sa, qb, sb, o, c)
            for _ in range(args.rounds):
                for name, _ in runnable:
                    times[name].append(bench_graph(graphs[name], args.repeats))
            if not runnable:
                continue
            first = outs[runnable[0][0]]
            for name, _ in runnable:
                us = statistics.median(times[name])
                spread = (max(times[name]) - min(times[name])) / us * 100
                diff = G.calc_diff(outs[name], first)
                nan = int(torch.isnan(outs[name]).sum())
                print(f"| {m} | {n} | {k} | {text} | {name} | {us:.1f} | {2 * m * n * k / us / 1e6:.0f} "
                      f"| {spread:.1f} | {diff:.1e}{f' NaN {nan}' if nan else ''} |")


def _call(folder, qa, sa, qb, sb, out, config):
    with kernels_from(folder):
        K.fp8_gemm_nt(qa, sa, qb, sb, out, config)


if __name__ == "__main__":
    main()

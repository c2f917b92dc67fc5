"""Does the benchmarks' L2 flush cost the timed region? (GPU only; one call, a few minutes.)

The usual flush (a 256 MiB ``zero_()``) leaves the L2 full of dirty lines; the timed region then
writes them back as it evicts them. For a bandwidth-bound step (decode, small-M GEMMs) that is
up to ~50 MB of writes not its own. This times the same graphs under the flush modes of
``common.flush_l2`` (``write``, ``clean``) and with no flush (``none``: inputs may be L2 hits),
interleaved over two rounds, so the difference is measured, not assumed.

    python benchmarks/flush_probe.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_gemm import cublas_blockwise, graph_replay, make_inputs  # noqa: E402
from bench_grouped import _act, _rand  # noqa: E402

from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.heuristics import dense_config, masked_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402

kModes = ("write", "clean", "none")


def timed(fn, mode, repeats):
    """Median of ``fn`` (a graph replay or a callable) under flush ``mode``."""
    if mode == "none":
        return common.bench(fn, repeats=repeats, flush=False)
    with common.flush_as(mode):
        return common.bench(fn, repeats=repeats)


def cases():
    """(label, bytes the case must move, callable) — graphs where the op allows it; yielded one
    at a time, so each is timed right after it is built (and a fault names its case)."""
    sms = num_sms(torch.cuda.current_device())
    gen = torch.Generator(device="cuda").manual_seed(7)
    for n, k in ((4096, 7168), (7168, 2048)):  # the layer's one-token step: 8 of 32 experts x 1 row
        x, w = _rand((32, 128, k), gen), _rand((32, n, k), gen)
        qa, sa = _act(x)
        qb, sb = ref.per_block_quant(w)
        masked_m = torch.tensor([1] * 8 + [0] * 24, dtype=torch.int32, device="cuda")
        d = torch.empty(32, 128, n, dtype=torch.bfloat16, device="cuda")
        cfg = masked_config(32, 1, n, k, sms)
        yield (f"masked 8 of 32 x1, N {n} K {k}", 8 * n * k,
               graph_replay(lambda qa=qa, sa=sa, qb=qb, sb=sb, m=masked_m, d=d, c=cfg:
                            K.m_grouped_masked(qa, sa, qb, sb, m, 1, d, c)))
    for m, n, k in ((64, 7168, 2048), (64, 7168, 16384), (128, 4096, 7168)):
        qa, sa, qb, sb = make_inputs(m, n, k)
        d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        cfg = dense_config(m, n, k, sms)
        yield (f"dense {m}x{n}x{k} ours", n * k,
               graph_replay(lambda qa=qa, sa=sa, qb=qb, sb=sb, d=d, c=cfg:
                            K.fp8_gemm_nt(qa, sa, qb, sb, d, c)))
        blockwise = cublas_blockwise()
        if blockwise is not None:
            sa_t = torch.empty(k // 128, m, device="cuda").t().copy_(sa)
            yield (f"dense {m}x{n}x{k} cuBLAS", n * k,
                   graph_replay(lambda qa=qa, s=sa_t, qb=qb, sb=sb: blockwise(qa, s, qb, sb)))
    src = torch.randn(32 << 20, device="cuda")  # 128 MB read, 4 B written
    yield ("read 128 MB (sum)", src.numel() * 4, graph_replay(lambda: src.sum()))


def decode_cases():
    from moe_fp8.layers import MoE, MoEConfig
    cfg = MoEConfig.deepseek_v3(num_experts=32)
    moe = MoE(cfg, device="cuda", seed=0)
    for n in (1, 8, 256):
        x = torch.randn(n, cfg.hidden_size, device="cuda", generator=torch.Generator(
            device="cuda").manual_seed(1000 + n)).bfloat16()
        run = moe.decode_runner(max_tokens=n)
        run(x)
        yield (f"layer decode {n} tokens", 0, lambda run=run, x=x: run(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-layer", action="store_true")
    parser.add_argument("--only", default="", help="only the cases whose label has this text")
    args = parser.parse_args()
    items = itertools.chain(cases(), [] if args.no_layer else decode_cases())
    rows = []
    for label, nbytes, fn in items:
        if args.only not in label:
            continue
        torch.cuda.synchronize()  # a fault in the build (eager call) is reported here, by case
        print(f"built: {label}", flush=True)
        row = {"case": label}
        for rnd in (1, 2):
            for mode in kModes:
                us = timed(fn, mode, args.repeats)
                row[f"{mode}_{rnd}_us"] = us
                if nbytes:
                    row[f"{mode}_{rnd}_GBs"] = nbytes / us / 1e3
        rows.append(row)
        common.print_row(row)
    common.write_results("flush_probe", rows, "modes: write = 256 MiB zero_() (the usual flush), "
                         "clean = that write then a 256 MiB read, none = no flush; two rounds each")


if __name__ == "__main__":
    main()

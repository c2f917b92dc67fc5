"""The eager layer's contiguous layout sized exactly (one host sync per forward) or by its upper
bound (no sync; up to E_loc x 127 padding rows the GEMMs skip), at the batch sizes where the
default ``contiguous_rows="auto"`` still syncs (below ~2032 tokens on 32 experts).

One DeepSeek-V3-shaped layer (32 experts). Per token count, two figures per mode:
* ``*_us``: device us per forward, L2 flushed before each, the two modes in turns;
* ``*_stream_us``: us per forward of 20 back-to-back forwards (what a stack of layers sees: the
  host can run ahead of the card only where nothing syncs).

    python benchmarks/experiments/contiguous_rows_ab.py [--tokens 256,512,1024,2048,4096]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import _device_ms, bench_interleaved, markdown_table  # noqa: E402

from moe_fp8.gemm import calc_diff  # noqa: E402
from moe_fp8.layers import MoE, MoEConfig  # noqa: E402

kModes = ("exact", "upper_bound")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="256,512,1024,2048,4096")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-calls", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("contiguous_rows_ab.py needs a CUDA GPU")
    cfg = MoEConfig.deepseek_v3(num_experts=32)
    moe = MoE(cfg, device="cuda", seed=0)

    def forward(mode: str, x: torch.Tensor):
        moe.dispatcher.contiguous_rows = mode
        return moe(x)

    rows = []
    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, cfg.hidden_size, device="cuda").bfloat16()
            outs = {m: forward(m, x).clone() for m in kModes}
            flushed = {m: [] for m in kModes}
            stream = {m: [] for m in kModes}
            for _ in range(args.rounds):
                for m, t in zip(kModes, bench_interleaved([lambda m=m: forward(m, x) for m in kModes],
                                                          repeats=10, warmup=2)):
                    flushed[m].append(t)
                for m in kModes:
                    forward(m, x)
                    torch.cuda.synchronize()
                    stream[m].append(_device_ms(lambda: forward(m, x), args.stream_calls)
                                     * 1e3 / args.stream_calls)
            row = {"tokens": n}
            for m in kModes:
                row[f"{m}_us"] = statistics.median(flushed[m])
                row[f"{m}_stream_us"] = statistics.median(stream[m])
            row["bound_minus_exact_us"] = row["upper_bound_us"] - row["exact_us"]
            row["stream_bound_minus_exact_us"] = row["upper_bound_stream_us"] - row["exact_stream_us"]
            row["diff"] = calc_diff(outs["upper_bound"], outs["exact"])
            row["rounds_exact"] = "/".join(f"{t:.0f}" for t in flushed["exact"])
            row["rounds_bound"] = "/".join(f"{t:.0f}" for t in flushed["upper_bound"])
            rows.append(row)
    print(f"{torch.cuda.get_device_name()}; one layer of 32 experts; {args.rounds} rounds, medians")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

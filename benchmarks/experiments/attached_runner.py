"""A model's MoE layers with and without attached graph runners (``attach_graph_runners``).

Two DeepSeek-V3-shaped layers (32 experts each) in a row, ``model(x)`` timed per batch size:
eagerly (the contiguous layout, host-bound below ~512 tokens) and with runners of ``--max-tokens``
attached (one graph replay per layer and a copy of its output). Device us per call (CUDA events,
L2 flushed, medians); the same layers and inputs in turns.

    python benchmarks/experiments/attached_runner.py [--tokens 1,64,256,512] [--max-tokens 512]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import bench, markdown_table  # noqa: E402

from moe_fp8.gemm import calc_diff  # noqa: E402
from moe_fp8.layers import MoE, MoEConfig, attach_graph_runners  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1,64,256,512")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attached_runner.py needs a CUDA GPU")
    cfg = MoEConfig.deepseek_v3(num_experts=32)
    model = torch.nn.Sequential(*(MoE(cfg, device="cuda", seed=s) for s in (0, 1)))
    runners = attach_graph_runners(model, args.max_tokens)

    def attach(on: bool) -> None:
        for layer, runner in zip(model, runners):
            layer.attach_graph_runner(runner if on else None)

    rows = []
    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, cfg.hidden_size, device="cuda").bfloat16()
            attach(False)
            eager_y = model(x).clone()
            times = {"eager": [], "attached": []}
            for _ in range(args.rounds):
                attach(False)
                times["eager"].append(bench(lambda: model(x), repeats=10, warmup=2))
                attach(True)
                times["attached"].append(bench(lambda: model(x), repeats=10, warmup=2))
            graph_y = model(x)
            eager_us, graph_us = (statistics.median(times[k]) for k in ("eager", "attached"))
            rows.append({"tokens": n, "eager_us": eager_us, "attached_us": graph_us,
                         "speedup": eager_us / graph_us, "diff": calc_diff(graph_y, eager_y)})
    print(f"{torch.cuda.get_device_name()}; two layers of 32 experts; runners of "
          f"{args.max_tokens} tokens; {args.rounds} rounds in turns, medians")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

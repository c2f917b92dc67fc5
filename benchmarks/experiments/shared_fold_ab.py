"""Would the shared expert run faster as one more routed expert? A: the layer as shipped (the
shared MLP on a side stream through the dense GEMMs, its output added by the combine). B: the
shared expert's weights appended to the routed stack as expert E_loc (DeepSeek-V3's shared width
equals the routed one), every token routed to it at weight 1 (a (k + 1)-th column), so one
grouped fused-SwiGLU GEMM and one grouped down GEMM carry both and the combine sums k + 1 rows.

Built outside the layer (its own stacked copy of the weights, the extra column by a torch.cat):
the measurement decides whether the layer gets it. Eager prefill (``MoE.forward`` against B's
eager step) and the graph runner's contiguous buckets (``forward_contiguous_static`` against B's
static step, each captured in a CUDA graph), in turns, L2 flushed, medians of ``--rounds``.
Outputs are compared (different summation order: close, not bitwise).

    python benchmarks/experiments/shared_fold_ab.py [--tokens 2048,4096,8192] [--graph-tokens 1024,2048]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import bench_interleaved, markdown_table  # noqa: E402

from moe_fp8.gemm import calc_diff  # noqa: E402
from moe_fp8.layers import MoE, MoEConfig  # noqa: E402
from moe_fp8.layers.dispatch.local import LocalDispatcher  # noqa: E402
from moe_fp8.layers.experts import RoutedExperts  # noqa: E402
from moe_fp8.layers.permute import quantize_tokens  # noqa: E402


class FoldedStep:
    """B: the layer's routed experts plus its shared expert as expert E_loc."""

    def __init__(self, moe: MoE):
        cfg, routed, shared = moe.cfg, moe.experts, moe.shared_experts
        if shared.inter != routed.inter:
            raise SystemExit("the fold needs the shared width equal to the routed one")
        e = routed.num_experts_local
        self.moe, self.experts_local = moe, e
        self.experts = RoutedExperts(e + 1, routed.hidden, routed.inter, device=routed.w13.device,
                                     pow2_scale=routed.pow2_scale)
        with torch.no_grad():
            self.experts.load_fp8(torch.cat([routed.w13, shared.w13[None]]),
                                  torch.cat([routed.w13_scale, shared.w13_scale[None]]),
                                  torch.cat([routed.w2, shared.w2[None]]),
                                  torch.cat([routed.w2_scale, shared.w2_scale[None]]))
        self.dispatcher = LocalDispatcher(e + 1, cfg.hidden_size, cfg.top_k + 1,
                                          pow2_scale=cfg.pow2_scale)

    @torch.no_grad()
    def __call__(self, x2: torch.Tensor, num_valid=None, out=None) -> torch.Tensor:
        xq, xs = quantize_tokens(x2, self.moe.cfg.pow2_scale)
        routing = self.moe.gate(x2)
        t = x2.shape[0]
        ids = torch.cat([routing.topk_idx, routing.topk_idx.new_full((t, 1), self.experts_local)], 1)
        weights = torch.cat([routing.topk_weights, routing.topk_weights.new_ones(t, 1)], 1)
        layout, handle = self.dispatcher.dispatch_contiguous((xq, xs), ids, weights,
                                                             num_valid_tokens=num_valid)
        y_rows = self.experts.forward_contiguous(layout)
        return self.dispatcher.combine_contiguous(y_rows, handle, out=out)


def captured(step, x, num_valid, out):
    """``step(x, num_valid, out)`` captured in a CUDA graph (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(x, num_valid, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x, num_valid, out)
    return graph


def rounds(fns, n_rounds):
    times = [[] for _ in fns]
    for _ in range(n_rounds):
        for i, t in enumerate(bench_interleaved(fns, repeats=10, warmup=2)):
            times[i].append(t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="2048,4096,8192")
    parser.add_argument("--graph-tokens", default="1024,2048")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("shared_fold_ab.py needs a CUDA GPU")
    moe = MoE(MoEConfig.deepseek_v3(num_experts=32), device="cuda", seed=0)
    folded = FoldedStep(moe)
    rows = []

    def add_row(mode, n, a_out, b_out, times):
        a_us, b_us = times
        row = {"mode": mode, "tokens": n, "A_us": statistics.median(a_us),
               "B_us": statistics.median(b_us)}
        row["B_minus_A_us"] = row["B_us"] - row["A_us"]
        row["calc_diff_A_B"] = calc_diff(a_out.float(), b_out.float())
        row["rounds_A"] = "/".join(f"{t:.0f}" for t in a_us)
        row["rounds_B"] = "/".join(f"{t:.0f}" for t in b_us)
        rows.append(row)
        print(row, flush=True)

    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",") if t):
            x = torch.randn(n, moe.cfg.hidden_size, device="cuda").bfloat16()
            add_row("eager", n, moe(x), folded(x),
                    rounds([lambda: moe(x), lambda: folded(x)], args.rounds))
        for n in (int(t) for t in args.graph_tokens.split(",") if t):
            x = torch.randn(n, moe.cfg.hidden_size, device="cuda").bfloat16()
            num_valid = torch.full((), n, dtype=torch.int64, device="cuda")
            out_a, out_b = torch.empty_like(x), torch.empty_like(x)
            graph_a = captured(lambda x_, v, o: moe.forward_contiguous_static(
                x_, num_valid_tokens=v, out=o), x, num_valid, out_a)
            graph_b = captured(folded, x, num_valid, out_b)
            times = rounds([graph_a.replay, graph_b.replay], args.rounds)
            add_row("graph", n, out_a, out_b, times)
    print(f"{torch.cuda.get_device_name()}; one layer of 32 experts (+1 shared); A shipped, "
          f"B shared folded as expert 32; {args.rounds} rounds in turns, medians")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

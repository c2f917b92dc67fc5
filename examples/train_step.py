"""A few optimizer steps of a DeepSeek-V3-shaped MoE layer trained in FP8, on a synthetic regression.

    x [T, H] ──Router (sigmoid, group-limited top-k, aux-loss-free bias)──> topk_idx, topk_weights
      └─ permute (contiguous layout) ─> x_rows [M_sum, H] ─> experts_forward_fp8 (FP8 fwd + bwd)
                                                           └─> y_rows ─ weighted combine ─> y [T, H]
    loss = mse(y, teacher(x))                                     teacher: a fixed random bf16 layer

Master weights are fp32 Parameters; their FP8 copies come from an ``Fp8WeightCache`` (made once
per optimizer step). The router weight trains through the combine's top-k weights; the
correction bias follows ``Router.update_bias`` from the tokens each expert received.

    python examples/train_step.py                 # CPU: tiny layer (H 256, I 128, 8 experts), < 30 s
    python examples/train_step.py --size v3       # Hopper: H 7168, I 2048, 32 experts, top-8, 4096 tokens

It also trains the same layer with unquantised bf16 experts (torch._grouped_mm with autograd on
a GPU, one matmul per expert on CPU) and prints median step time (and peak memory on a GPU) of both.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from moe_fp8.layers.autograd import Fp8WeightCache, experts_forward_fp8, experts_forward_torch
from moe_fp8.layers.config import MoEConfig
from moe_fp8.layers.layouts import contiguous_index, local_expert_ids
from moe_fp8.layers.permute import combine_index_contiguous, unpermute_combine
from moe_fp8.layers.router import Router, tokens_per_expert

SIZES = {
    # name: (MoEConfig, tokens)
    "tiny": (MoEConfig.tiny(num_experts=8, top_k=4, n_group=4, topk_group=2), 128),
    "v3": (MoEConfig.deepseek_v3(num_experts=32, top_k=8, n_group=8, topk_group=4), 4096),
}


class TrainableExperts(nn.Module):
    """Router + routed experts (fp32 masters) + weighted combine; ``fp8`` picks the expert math."""

    def __init__(self, cfg: MoEConfig, device, fp8: bool, seed: int):
        super().__init__()
        self.cfg, self.fp8 = cfg, fp8
        gen = torch.Generator(device=device).manual_seed(seed)
        hidden, inter, experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.gate = Router(cfg, device=device)
        with torch.no_grad():
            self.gate.weight.normal_(std=hidden ** -0.5, generator=gen)
        # fp32 master weights: w13 [E, 2I, H] = [gate; up] rows, w2 [E, H, I]
        self.w13 = nn.Parameter(torch.randn(experts, 2 * inter, hidden, generator=gen, device=device)
                                * hidden ** -0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, inter, generator=gen, device=device)
                               * inter ** -0.5)
        self.cache = Fp8WeightCache()

    def forward(self, x: torch.Tensor):
        """``x [T, H]`` bf16 -> (``y [T, H]`` bf16, tokens per expert int64 ``[E]``)."""
        routing = self.gate(x)  # topk weights carry the router's gradient
        experts, top_k = self.cfg.num_experts, self.cfg.top_k
        index = contiguous_index(local_expert_ids(routing.topk_idx, 0, experts), experts)
        row_token = torch.where(index.row_pair >= 0, index.row_pair // top_k, 0)  # [M_sum]
        x_rows = x.index_select(0, row_token)  # [M_sum, H]; its backward sums dX rows per token
        if self.fp8:
            y_rows = experts_forward_fp8(x_rows, index.m_indices, self.w13, self.w2, self.cache,
                                         pow2_scale=self.cfg.pow2_scale)
        else:
            y_rows = experts_forward_torch(x_rows, index.m_indices, self.w13, self.w2)
        y = unpermute_combine(y_rows, combine_index_contiguous(index, routing.topk_weights))
        return y, tokens_per_expert(routing.topk_idx, experts)


def train(cfg: MoEConfig, tokens: int, steps: int, device, fp8: bool, lr: float, log: bool):
    """Returns (losses, median step seconds, peak bytes or None, builds of the weight cache)."""
    torch.manual_seed(0)
    teacher = TrainableExperts(cfg, device, fp8=False, seed=1)
    student = TrainableExperts(cfg, device, fp8=fp8, seed=2)
    x = torch.randn(tokens, cfg.hidden_size, device=device).to(torch.bfloat16)
    with torch.no_grad():
        target = teacher(x)[0].float()  # [T, H] the regression target
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for step in range(steps):
        start = time.perf_counter()
        y, load = student(x)
        loss = F.mse_loss(y.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        student.gate.update_bias(load, rate=1e-3)  # aux-loss-free balancing (DeepSeek-V3)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if log:
            print(f"  step {step:3d}  loss {losses[-1]:.5f}  ({times[-1] * 1e3:.1f} ms)")
    peak = torch.cuda.max_memory_allocated() if cuda else None
    median = statistics.median(times[1:] if len(times) > 1 else times)  # step 0 compiles/warms
    return losses, median, peak, student.cache.builds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    parser.add_argument("--device", default="cuda" if hopper else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="v3" if hopper else "tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 comparison run")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg, tokens = SIZES[args.size]
    print(f"FP8 training: {args.size} layer (H {cfg.hidden_size}, I {cfg.moe_intermediate_size}, "
          f"{cfg.num_experts} experts, top-{cfg.top_k}), {tokens} tokens, {args.steps} Adam steps on {device}")
    losses, step_s, peak, builds = train(cfg, tokens, args.steps, device, True, args.lr, log=True)
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f}; FP8 weight copies made {builds}x "
          f"({args.steps} steps: once per optimizer step)")
    if not losses[-1] < 0.7 * losses[0]:
        raise SystemExit(f"loss did not fall enough: {losses[0]:.5f} -> {losses[-1]:.5f}")
    rows = [("fp8 (moe_fp8)", step_s, peak, losses[-1])]
    if not args.no_bf16:
        bf16_losses, bf16_s, bf16_peak, _ = train(cfg, tokens, args.steps, device, False, args.lr, log=False)
        peer = "bf16 (_grouped_mm)" if device.type == "cuda" else "bf16 (torch, per expert)"
        rows.append((peer, bf16_s, bf16_peak, bf16_losses[-1]))
    print("\n| experts | step ms (median) | peak GiB | final loss |\n|---|---|---|---|")
    for name, secs, peak_bytes, final in rows:
        peak_text = f"{peak_bytes / 2**30:.2f}" if peak_bytes is not None else "-"
        print(f"| {name} | {secs * 1e3:.1f} | {peak_text} | {final:.5f} |")
    if len(rows) == 2 and device.type == "cuda":
        print(f"\nfp8 speed-up over bf16: {rows[1][1] / rows[0][1]:.2f}x per step "
              "(a 'kernel family unavailable' warning above means that op ran its slow reference)")


if __name__ == "__main__":
    main()

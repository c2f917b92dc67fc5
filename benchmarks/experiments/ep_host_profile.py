"""Where the expert-parallel prefill exchange spends its host time (rank 0's view).

    python -m torch.distributed.run --standalone --nproc-per-node N \
        benchmarks/experiments/ep_host_profile.py [--tokens 4096] [--calls 20]

bench_ep.py times dispatch_contiguous at 4096 tokens per rank at ~1.3-1.6 ms on one H100 (EP = 1,
2026-12-07) while its kernels are busy ~0.4 ms of it: the rest is the host issuing work around
the one host sync. This prints, per exchange (dispatch with the torch send side, with the ep_send
kernels, combine): the median host wall time of one call (synchronised before and after), the
time the host spends blocked in the sync (``Tensor.tolist``), and cProfile's functions by total
own time over ``--calls`` calls, so the host cost is attributed to the Python function (or
torch op binding) that pays it. Works on CPU with gloo (``--cpu``) for a smoke test.
"""
import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_ep import routing  # noqa: E402
from common import env  # noqa: E402

from moe_fp8.layers import MoEConfig  # noqa: E402
from moe_fp8.layers.dispatch.torch_dist import TorchDistDispatcher  # noqa: E402
from moe_fp8.layers.permute import quantize_tokens  # noqa: E402


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_us(fn, device, calls: int) -> float:
    """Median host wall time of one call, the device idle before it and drained after it."""
    times = []
    for _ in range(calls):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def profile(fn, calls: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    cuda = not args.cpu
    rank = int(os.environ.get("RANK", 0))
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    group, world = dist.group.WORLD, dist.get_world_size()
    cfg = MoEConfig.deepseek_v3() if cuda else MoEConfig.tiny(hidden_size=384, top_k=8, n_group=4,
                                                               topk_group=4)
    tokens = args.tokens if cuda else min(args.tokens, 64)
    disp = TorchDistDispatcher(cfg, group)
    x, topk_idx, topk_w = routing(tokens, cfg, device, seed=rank)
    xq, xs = quantize_tokens(x)
    layout, handle = disp.dispatch_contiguous((xq, xs), topk_idx, topk_w)
    y_rows = torch.randn(layout.a.shape[0], cfg.hidden_size, device=device).bfloat16()

    def dispatch(fused: bool):
        def fn():
            with env(MOE_FP8_FUSED_EP="1" if fused else "0"):
                disp.dispatch_contiguous((xq, xs), topk_idx, topk_w)
        return fn

    def combine():
        disp.combine_contiguous(y_rows, handle)

    cases = [("dispatch (torch send side)", dispatch(False))]
    if cuda:
        cases.append(("dispatch (ep_send kernels)", dispatch(True)))
    cases.append(("combine", combine))
    if rank == 0:
        print(f"EP = {world}, {tokens} tokens per rank, {cfg.num_experts} experts, H {cfg.hidden_size}, "
              f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}")
    for name, fn in cases:
        for _ in range(3):
            fn()
        dist.barrier()
        us = wall_us(fn, device, args.calls)
        dist.barrier()
        text = profile(fn, args.calls, args.top)
        _sync(device)
        if rank == 0:
            print(f"\n== {name}: host wall {us:.0f} us per call (median of {args.calls}, device "
                  f"drained before and after)")
            print(text)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
